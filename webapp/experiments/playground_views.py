"""The playground pages: one prompt to the base model and up to four adapters, answered by a
worker side by side, and the votes for the best answer."""

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.db.models import Count
from django.http import JsonResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from django_htmx.http import HTMX_STOP_POLLING

from webapp.accounts.permissions import Action, can
from webapp.experiments import selectors, services
from webapp.experiments.forms import (
    PlaygroundForm,
)
from webapp.experiments.models import RunStatus
from webapp.http import error_text, int_or_none


@require_GET
def health(request):
    return JsonResponse({"status": "ok"})


PLAYGROUND_CHOICES = 50  # the newest succeeded runs offered


def _playground_runs(user):
    runs = selectors.run_list_for_user(user=user).filter(status=RunStatus.SUCCEEDED)
    return runs.order_by("-created_at", "-id")


@login_required
@require_http_methods(["GET", "POST"])
def playground(request):
    choices = _playground_runs(request.user)
    offered = choices.filter(id__in=list(choices.values_list("id", flat=True)[:PLAYGROUND_CHOICES]))
    if request.method == "POST":
        form = PlaygroundForm(request.POST, runs=choices)
        if form.is_valid():
            try:
                prompt = services.playground_prompt_create(
                    user=request.user,
                    runs=list(form.cleaned_data["runs"]),
                    text=form.cleaned_data["text"],
                )
            except (ValidationError, PermissionDenied) as exc:
                form.add_error(None, error_text(exc))
            else:
                return redirect("playground_prompt", prompt_id=prompt.id)
        form.fields["runs"].queryset = offered | choices.filter(id__in=request.POST.getlist("runs"))
        status = 400
    else:
        picked = [i for i in (int_or_none(v) for v in request.GET.get("runs", "").split(",")) if i]
        form = PlaygroundForm(
            initial={"runs": picked}, runs=offered | choices.filter(id__in=picked)
        )
        status = 200
    recent = selectors.playground_prompt_list_for_user(user=request.user)[:10]
    context = {"form": form, "recent": recent, "has_runs": choices.exists()}
    return render(request, "experiments/playground.html", context, status=status)


def _prompt_context(request, prompt_id: int) -> dict:
    prompt = selectors.playground_prompt_get_for_user(user=request.user, prompt_id=prompt_id)
    runs = list(prompt.runs.order_by("id"))
    mine = prompt.votes.filter(user=request.user).first()
    votes = {
        str(v["run_id"] or "base"): v["n"]
        for v in prompt.votes.values("run_id").annotate(n=Count("id"))
    }
    columns = [("base", "Base model", None)] if prompt.task == "causal-lm" else []
    columns += [(str(run.id), run.name, run) for run in runs]
    cells = [
        {
            "key": key,
            "title": title,
            "run": run,
            "answer": prompt.answers.get(key),
            "votes": votes.get(key, 0),
            "mine": mine is not None and str(mine.run_id or "base") == key,
        }
        for key, title, run in columns
    ]
    can_vote = can(user=request.user, team=prompt.team, action=Action.ANNOTATE)
    return {"prompt": prompt, "cells": cells, "can_vote": can_vote}


@login_required
@require_GET
def playground_prompt(request, prompt_id: int):
    context = _prompt_context(request, prompt_id)
    if request.htmx:
        response = render(request, "experiments/playground_prompt.html#answers", context)
        if context["prompt"].is_finished:
            response.status_code = HTMX_STOP_POLLING
        return response
    return render(request, "experiments/playground_prompt.html", context)


@login_required
@require_POST
def playground_vote(request, prompt_id: int):
    prompt = selectors.playground_prompt_get_for_user(user=request.user, prompt_id=prompt_id)
    choice = request.POST.get("choice", "")
    run = None
    if choice != "base":
        run_id = int_or_none(choice)
        run = prompt.runs.filter(id=run_id).first() if run_id else None
        if run is None:
            messages.error(request, "Pick one of the answers.")
            return redirect("playground_prompt", prompt_id=prompt.id)
    try:
        services.playground_vote(user=request.user, prompt=prompt, run=run)
    except (ValidationError, PermissionDenied) as exc:
        messages.error(request, error_text(exc))
    return redirect("playground_prompt", prompt_id=prompt.id)
