"""{{ run.id|run_color }}: the run's colour (colors.py), for the swatch beside its name."""

from django import template

from webapp.experiments.colors import run_color as color_of

register = template.Library()


@register.filter
def run_color(run_id: int) -> str:
    return color_of(run_id)
