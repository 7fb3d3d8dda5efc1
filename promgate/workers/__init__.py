"""Worker processes on one host: a supervisor that binds every listener once and runs
``workers`` gateway processes sharing those sockets, speaking to each over AMP.

``supervisor.py`` is the supervisor's service (binding, spawning, replacing, stopping, the
admin listener); ``slots.py`` one worker's place and lifecycle as the supervisor sees it;
``control.py`` the AMP commands between the two; ``coordinator.py`` the all-or-none
reload; ``worker.py`` the worker process (``python -m promgate.workers``); ``metrics.py``
the supervisor's ``/metrics``, every worker's added up; ``reactors.py`` the reactor roles.
"""
