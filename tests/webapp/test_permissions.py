"""Every cell of the role matrix in docs/PERMISSIONS.md, through the real selectors and services.

Each action does what its view does: fetch the object with the `*_for_user` selector (another
team's id: Http404, before any service runs), then call the service (a role that lacks the
right: PermissionDenied). An allowed cell must also have written; a denied one must not.
"""

from dataclasses import dataclass
from datetime import timedelta
from types import SimpleNamespace

import pytest
from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import Http404
from django.test import override_settings
from django.utils import timezone

from webapp.accounts import selectors as account_selectors
from webapp.accounts import services as account_services
from webapp.accounts.models import Invitation, Membership, Role
from webapp.adapter_registry import selectors as adapter_selectors
from webapp.adapter_registry import services as adapter_services
from webapp.adapter_registry.models import ModelAlias, ModelVersion, RegisteredModel
from webapp.experiments import selectors, services
from webapp.experiments.artifacts import artifact_insert
from webapp.experiments.method_forms import SweepItem
from webapp.experiments.models import (
    Artifact,
    Comment,
    Dataset,
    Project,
    Run,
    RunStatus,
    ShareLink,
    Sweep,
    Tag,
)
from webapp.registry import selectors as registry_selectors
from webapp.registry import services as registry_services
from webapp.registry.models import BaseModel

pytestmark = pytest.mark.django_db

ROLES = ("viewer", "member", "admin", "owner", "other")
MEMBERS_UP = ("member", "admin", "owner")
ADMINS_UP = ("admin", "owner")
EVERY_ROLE = ("viewer", "member", "admin", "owner")


def _user(username: str, team, role: str):
    user = get_user_model().objects.create_user(username=username, password=f"{username}-pw-9")
    Membership.objects.create(team=team, user=user, role=role)
    return user


def _run(cast, name: str, status=RunStatus.SUCCEEDED, sweep=None) -> Run:
    return Run.objects.create(
        project=cast.acme_project,
        sweep=sweep,
        name=name,
        created_by=cast.alice,
        base_model="tiny-llama",
        dataset=cast.datasets["sample-instructions"],
        method="lora",
        method_config={"r": 4},
        train_config={"steps": 1},
        total_steps=1,
        status=status,
    )


@pytest.fixture
def ctx(cast, model_root):
    """Acme with all four roles (dave is its admin), a spare member erin, a second owner olga,
    and one object of each kind to act on."""
    dave = _user("dave", cast.acme, Role.ADMIN)
    erin = _user("erin", cast.acme, Role.MEMBER)
    olga = _user("olga", cast.acme, Role.OWNER)
    users = {
        "viewer": cast.carol,
        "member": cast.bob,
        "admin": dave,
        "owner": cast.alice,
        "other": cast.mallory,
    }
    run = _run(cast, "finished")
    artifact = Artifact.objects.create(run=run, kind="adapter", name="a.bin", size=0, sha256="")
    sweep = Sweep.objects.create(
        project=cast.acme_project,
        name="grid",
        created_by=cast.alice,
        base_model="tiny-llama",
        dataset=cast.datasets["sample-instructions"],
    )
    _run(cast, "grid · r=4", sweep=sweep)
    upload = Dataset.objects.create(
        team=cast.acme, name="upload", task="causal-lm", created_by=cast.alice
    )
    return SimpleNamespace(
        cast=cast,
        team=cast.acme,
        users=users,
        erin=Membership.objects.get(user=erin, team=cast.acme),
        olga=Membership.objects.get(user=olga, team=cast.acme),
        run=run,
        queued=_run(cast, "queued", status=RunStatus.QUEUED),
        artifact=artifact,
        sweep=sweep,
        upload=upload,
        member_count=Membership.objects.filter(team=cast.acme).count(),
        model=BaseModel.objects.create(
            team=cast.acme, name="ours", source="local", location=str(model_root / "my-qwen")
        ),
        model_root=model_root,
    )


def _someone_else(ctx, user):
    """A teammate who is not `user`, for "other people's" objects."""
    return ctx.cast.bob if user == ctx.cast.alice else ctx.cast.alice


# ---- the actions, each as its view performs it --------------------------------------------


def read(ctx, user):
    run = selectors.run_get_for_user(user=user, run_id=ctx.run.id)
    selectors.metric_series(run=run)
    selectors.artifact_get_for_user(user=user, artifact_id=ctx.artifact.id)
    selectors.sweep_get_for_user(user=user, sweep_id=ctx.sweep.id)
    selectors.dataset_get_for_user(user=user, dataset_id=ctx.upload.id)


def read_models(ctx, user):
    registry_selectors.model_get_for_user(user=user, model_id=ctx.model.id)


def register_model(ctx, user):
    """As the register page does: the team among the user's, then the service."""
    team = selectors.team_list_for_user(user=user).filter(id=ctx.team.id).first()
    if team is None:
        raise Http404
    with override_settings(MODEL_ROOTS=[ctx.model_root]):
        registry_services.model_register(user=user, team=team, name="matrix", path="my-qwen")


def _registered(ctx) -> RegisteredModel:
    """Acme's "matrix-bot", v1 an adapter of a run of its own (not ctx.run, which is deleted)."""
    bot, created = RegisteredModel.objects.get_or_create(team=ctx.team, name="matrix-bot")
    if created:
        run = _run(ctx.cast, "registered")
        artifact_insert(run_id=run.id, kind="adapter", name="adapter_model.safetensors", data=b"w")
        ModelVersion.objects.create(registered=bot, number=1, run=run, adapter_version=1)
        RegisteredModel.objects.filter(id=bot.id).update(last_number=1)
        ctx.adapter_run = _run(ctx.cast, "to register")
        artifact_insert(
            run_id=ctx.adapter_run.id, kind="adapter", name="adapter_model.safetensors", data=b"x"
        )
    return bot


def read_registry(ctx, user):
    _registered(ctx)
    bot = adapter_selectors.registered_named_for_user(user=user, name="matrix-bot")
    version = adapter_selectors.version_selected(registered=bot, selector="v1")
    assert adapter_selectors.version_files(version)


def register_adapter(ctx, user):
    _registered(ctx)
    bot = adapter_selectors.registered_named_for_user(user=user, name="matrix-bot")
    run = selectors.run_get_for_user(user=user, run_id=ctx.adapter_run.id)
    adapter_services.version_create(user=user, registered=bot, run=run)


def move_alias(ctx, user):
    _registered(ctx)
    bot = adapter_selectors.registered_named_for_user(user=user, name="matrix-bot")
    version = adapter_selectors.version_get(registered=bot, number=1)
    adapter_services.alias_set(user=user, registered=bot, name="production", version=version)


def delete_registered_version(ctx, user):
    _registered(ctx)
    bot = adapter_selectors.registered_named_for_user(user=user, name="matrix-bot")
    version = adapter_selectors.version_get(registered=bot, number=1)
    adapter_services.version_delete(user=user, version=version)


def launch_run(ctx, user):
    project = selectors.project_get_for_user(user=user, project_id=ctx.cast.acme_project.id)
    services.run_create(
        user=user,
        project=project,
        name="matrix launch",
        base_model="tiny-llama",
        dataset=ctx.cast.datasets["sample-instructions"],
        method="lora",
        method_config={"r": 4},
        train_config={"steps": 1},
    )


def launch_sweep(ctx, user):
    project = selectors.project_get_for_user(user=user, project_id=ctx.cast.acme_project.id)
    services.sweep_create(
        user=user,
        project=project,
        name="matrix sweep",
        base_model="tiny-llama",
        dataset=ctx.cast.datasets["sample-instructions"],
        items=[SweepItem(method="lora", config={"r": 4}, label="lora r=4")],
        grid={},
        train_config={"steps": 1},
    )


def cancel_run(ctx, user):
    run = selectors.run_get_for_user(user=user, run_id=ctx.queued.id)
    services.run_cancel_request(user=user, run=run)


def upload_dataset(ctx, user):
    team = account_selectors.team_get_for_user(user=user, team_id=ctx.team.id)
    data = b'{"prompt": "2+2=", "completion": "4"}\n{"prompt": "3+3=", "completion": "6"}\n'
    services.dataset_upload_create(
        user=user, team=team, name="matrix data", filename="d.jsonl", data=data, task="causal-lm"
    )


def comment(ctx, user):
    run = selectors.run_get_for_user(user=user, run_id=ctx.run.id)
    services.comment_create(user=user, run=run, body="matrix comment")


def tag(ctx, user):
    run = selectors.run_get_for_user(user=user, run_id=ctx.run.id)
    services.run_tag_add(user=user, run=run, name="matrix")


def notes(ctx, user):
    run = selectors.run_get_for_user(user=user, run_id=ctx.run.id)
    services.run_notes_update(user=user, run=run, notes="matrix notes")


def _comment_by(ctx, author) -> Comment:
    return Comment.objects.create(run=ctx.run, author=author, body="to delete")


def delete_own_comment(ctx, user):
    ctx.comment = _comment_by(ctx, user)
    found = selectors.comment_get_for_user(user=user, comment_id=ctx.comment.id)
    services.comment_delete(user=user, comment=found)


def delete_others_comment(ctx, user):
    ctx.comment = _comment_by(ctx, _someone_else(ctx, user))
    found = selectors.comment_get_for_user(user=user, comment_id=ctx.comment.id)
    services.comment_delete(user=user, comment=found)


def create_share_link(ctx, user):
    run = selectors.run_get_for_user(user=user, run_id=ctx.run.id)
    services.share_link_create(user=user, team=run.project.team, scope="run", run=run, days=7)


def _link_by(ctx, creator) -> ShareLink:
    return ShareLink.objects.create(
        team=ctx.team,
        scope="run",
        run=ctx.run,
        digest=f"digest-of-{creator.username}",
        created_by=creator,
        expires_at=timezone.now() + timedelta(days=1),
    )


def revoke_own_share_link(ctx, user):
    ctx.link = _link_by(ctx, user)  # e.g. made while the user was a member
    link = selectors.share_link_get_for_user(user=user, link_id=ctx.link.id)
    services.share_link_revoke(user=user, link=link)


def revoke_any_share_link(ctx, user):
    ctx.link = _link_by(ctx, _someone_else(ctx, user))
    link = selectors.share_link_get_for_user(user=user, link_id=ctx.link.id)
    services.share_link_revoke(user=user, link=link)


def delete_run(ctx, user):
    run = selectors.run_get_for_user(user=user, run_id=ctx.run.id)
    services.run_delete(user=user, run=run)


def delete_sweep(ctx, user):
    sweep = selectors.sweep_get_for_user(user=user, sweep_id=ctx.sweep.id)
    services.sweep_delete(user=user, sweep=sweep)


def delete_dataset(ctx, user):
    dataset = selectors.dataset_get_for_user(user=user, dataset_id=ctx.upload.id)
    services.dataset_delete(user=user, dataset=dataset)


def invite(ctx, user):
    team = account_selectors.team_get_for_user(user=user, team_id=ctx.team.id)
    account_services.invitation_create(user=user, team=team, role=Role.VIEWER)


def _membership(ctx, user, membership_id: int) -> Membership:
    return account_selectors.membership_get_for_user(user=user, membership_id=membership_id)


def change_role(ctx, user):
    erin = _membership(ctx, user, ctx.erin.id)
    account_services.membership_role_change(user=user, membership=erin, role=Role.VIEWER)


def grant_owner(ctx, user):
    erin = _membership(ctx, user, ctx.erin.id)
    account_services.membership_role_change(user=user, membership=erin, role=Role.OWNER)


def change_owners_role(ctx, user):
    olga = _membership(ctx, user, ctx.olga.id)
    account_services.membership_role_change(user=user, membership=olga, role=Role.ADMIN)


def remove_member(ctx, user):
    erin = _membership(ctx, user, ctx.erin.id)
    account_services.membership_remove(user=user, membership=erin)


def remove_owner(ctx, user):
    olga = _membership(ctx, user, ctx.olga.id)
    account_services.membership_remove(user=user, membership=olga)


def see_audit_log(ctx, user):
    team = account_selectors.team_get_for_user(user=user, team_id=ctx.team.id)
    list(account_selectors.audit_list_for_team(user=user, team=team))


def create_project(ctx, user):
    team = account_selectors.team_get_for_user(user=user, team_id=ctx.team.id)
    account_services.project_create(user=user, team=team, name="matrix project")


def transfer_ownership(ctx, user):
    erin = _membership(ctx, user, ctx.erin.id)
    account_services.ownership_transfer(user=user, team=erin.team, new_owner_membership=erin)


def leave_team(ctx, user):
    own = Membership.objects.filter(user=user, team=ctx.team).first()
    # Someone of another team has no Acme membership; any Acme id they try is 404.
    membership = _membership(ctx, user, own.id if own else ctx.erin.id)
    account_services.membership_remove(user=user, membership=membership)


def _role(ctx, membership) -> str | None:
    return Membership.objects.filter(id=membership.id).values_list("role", flat=True).first()


@dataclass(frozen=True)
class Cell:
    do: object
    allowed: tuple[str, ...]
    written: object = None  # ctx, user -> bool; None for a read


MATRIX = {
    "read runs, metrics, datasets; download adapters": Cell(read, EVERY_ROLE),
    "launch runs": Cell(
        launch_run, MEMBERS_UP, lambda ctx, u: Run.objects.filter(name="matrix launch").exists()
    ),
    "launch sweeps": Cell(
        launch_sweep, MEMBERS_UP, lambda ctx, u: Sweep.objects.filter(name="matrix sweep").exists()
    ),
    "cancel runs": Cell(
        cancel_run,
        MEMBERS_UP,
        lambda ctx, u: Run.objects.get(id=ctx.queued.id).status == RunStatus.CANCELLED,
    ),
    "upload datasets": Cell(
        upload_dataset,
        MEMBERS_UP,
        lambda ctx, u: Dataset.objects.filter(name="matrix data").exists(),
    ),
    "comment": Cell(
        comment, MEMBERS_UP, lambda ctx, u: Comment.objects.filter(body="matrix comment").exists()
    ),
    "tag": Cell(tag, MEMBERS_UP, lambda ctx, u: Tag.objects.filter(name="matrix").exists()),
    "edit notes": Cell(
        notes, MEMBERS_UP, lambda ctx, u: Run.objects.get(id=ctx.run.id).notes == "matrix notes"
    ),
    "delete own comments": Cell(
        delete_own_comment,
        MEMBERS_UP,
        lambda ctx, u: not Comment.objects.filter(id=ctx.comment.id).exists(),
    ),
    "create share links": Cell(
        create_share_link,
        MEMBERS_UP,
        lambda ctx, u: ShareLink.objects.filter(created_by=u).exists(),
    ),
    "revoke own share links": Cell(
        revoke_own_share_link,
        MEMBERS_UP,
        lambda ctx, u: ShareLink.objects.get(id=ctx.link.id).revoked_at is not None,
    ),
    "revoke anyone's share links": Cell(
        revoke_any_share_link,
        ADMINS_UP,
        lambda ctx, u: ShareLink.objects.get(id=ctx.link.id).revoked_at is not None,
    ),
    "delete runs": Cell(
        delete_run, ADMINS_UP, lambda ctx, u: not Run.objects.filter(id=ctx.run.id).exists()
    ),
    "delete sweeps": Cell(
        delete_sweep, ADMINS_UP, lambda ctx, u: not Sweep.objects.filter(id=ctx.sweep.id).exists()
    ),
    "delete datasets": Cell(
        delete_dataset,
        ADMINS_UP,
        lambda ctx, u: not Dataset.objects.filter(id=ctx.upload.id).exists(),
    ),
    "delete others' comments": Cell(
        delete_others_comment,
        ADMINS_UP,
        lambda ctx, u: not Comment.objects.filter(id=ctx.comment.id).exists(),
    ),
    "see the team's registered base models": Cell(read_models, EVERY_ROLE),
    "register a base model (directory under an allowed root, Hub id@revision)": Cell(
        register_model, ADMINS_UP, lambda ctx, u: BaseModel.objects.filter(name="matrix").exists()
    ),
    "see the model registry; download registered adapters": Cell(read_registry, EVERY_ROLE),
    "register adapters in the model registry": Cell(
        register_adapter, MEMBERS_UP, lambda ctx, u: ModelVersion.objects.filter(number=2).exists()
    ),
    "set, move and remove model registry aliases": Cell(
        move_alias, MEMBERS_UP, lambda ctx, u: ModelAlias.objects.filter(name="production").exists()
    ),
    "delete registered adapter versions": Cell(
        delete_registered_version,
        ADMINS_UP,
        lambda ctx, u: not ModelVersion.objects.filter(number=1).exists(),
    ),
    "invite people": Cell(invite, ADMINS_UP, lambda ctx, u: Invitation.objects.exists()),
    "change roles below owner": Cell(
        change_role, ADMINS_UP, lambda ctx, u: _role(ctx, ctx.erin) == Role.VIEWER
    ),
    "remove members below owner": Cell(
        remove_member, ADMINS_UP, lambda ctx, u: _role(ctx, ctx.erin) is None
    ),
    "see the audit log": Cell(see_audit_log, ADMINS_UP),
    "create projects": Cell(
        create_project,
        ADMINS_UP,
        lambda ctx, u: Project.objects.filter(name="matrix project").exists(),
    ),
    "give the owner role": Cell(
        grant_owner, ("owner",), lambda ctx, u: _role(ctx, ctx.erin) == Role.OWNER
    ),
    "change an owner's role": Cell(
        change_owners_role, ("owner",), lambda ctx, u: _role(ctx, ctx.olga) == Role.ADMIN
    ),
    "remove an owner": Cell(remove_owner, ("owner",), lambda ctx, u: _role(ctx, ctx.olga) is None),
    "transfer ownership": Cell(
        transfer_ownership, ("owner",), lambda ctx, u: _role(ctx, ctx.erin) == Role.OWNER
    ),
    "leave the team": Cell(
        leave_team,
        EVERY_ROLE,
        lambda ctx, u: Membership.objects.filter(team=ctx.team).count() < ctx.member_count,
    ),
}


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("action", list(MATRIX))
def test_role_matrix(ctx, action, role):
    cell, user = MATRIX[action], ctx.users[role]
    if role in cell.allowed:
        cell.do(ctx, user)
        assert cell.written is None or cell.written(ctx, user), "allowed but nothing was written"
        return
    refusal = Http404 if role == "other" else PermissionDenied
    with pytest.raises(refusal):
        cell.do(ctx, user)
    assert cell.written is None or not cell.written(ctx, user), "refused but written"


def test_the_matrix_is_the_documented_one():
    """docs/PERMISSIONS.md lists exactly these actions; keep the two in step."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "PERMISSIONS.md").read_text()
    for action in MATRIX:
        assert f"| {action} |" in doc, action


# ---- the rules beside the table -----------------------------------------------------------


def test_the_last_owner_stays(ctx):
    account_services.membership_remove(user=ctx.cast.alice, membership=ctx.olga)
    alice = Membership.objects.get(user=ctx.cast.alice, team=ctx.team)
    for attempt in (
        lambda: account_services.membership_role_change(
            user=ctx.cast.alice, membership=alice, role=Role.ADMIN
        ),
        lambda: account_services.membership_remove(user=ctx.cast.alice, membership=alice),
    ):
        with pytest.raises(ValidationError):
            attempt()
    assert _role(ctx, alice) == Role.OWNER


def test_an_admin_cannot_invite_an_owner(ctx):
    with pytest.raises(ValidationError):
        account_services.invitation_create(user=ctx.users["admin"], team=ctx.team, role=Role.OWNER)


def test_a_token_acts_with_its_users_roles(ctx):
    """Tokens are per user: bob's token launches (member) but cannot delete (admin+)."""
    _, plain = account_services.api_token_create(user=ctx.cast.bob, name="ci")
    user = account_services.api_token_authenticate(plain=plain).user
    launch_run(ctx, user)
    with pytest.raises(PermissionDenied):
        delete_run(ctx, user)
    with pytest.raises(Http404):
        selectors.run_get_for_user(user=ctx.cast.mallory, run_id=ctx.run.id)


def test_someone_of_another_team_sees_none_of_acme(ctx):
    mallory = ctx.cast.mallory
    assert not selectors.run_list_for_user(user=mallory).filter(project__team=ctx.team).exists()
    assert ctx.upload not in selectors.dataset_list_for_user(user=mallory)
    assert ctx.team not in selectors.team_list_for_user(user=mallory)
    with pytest.raises(Http404):
        account_selectors.team_get_for_user(user=mallory, team_id=ctx.team.id)
