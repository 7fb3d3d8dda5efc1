"""promgate's trial suite; registers a deterministic Hypothesis profile for every run."""

from hypothesis import HealthCheck, settings

settings.register_profile(
    "promgate",
    derandomize=True,
    deadline=None,
    max_examples=200,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("promgate")
