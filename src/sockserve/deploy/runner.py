"""What runs ``sockserve serve``: one :class:`~.app.App` in this process, or a supervisor.

A module of its own, above both: the supervisor builds on the app's plan
(:func:`~.app.plan_units`, :func:`~.app.build_binding`), so the choice between
them cannot live in :mod:`.app` without the two importing each other.
"""

from __future__ import annotations

from .activation import InheritedSocket
from .app import App, AppSpec, Plan
from .supervisor import Supervisor


def make_runner(spec: AppSpec, inherited: list[InheritedSocket] | None = None) -> App | Supervisor:
    """Check ``spec`` and build what runs it: this process, or a supervisor of workers.

    Raises the library's errors (bad config, unknown service) before anything is bound.
    """
    if spec.workers != 1:
        return Supervisor(spec, inherited or [])
    return App(spec, Plan(inherited=inherited or []))
