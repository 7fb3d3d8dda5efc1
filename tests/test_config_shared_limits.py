"""The ``shared_limits`` section: defaults, the values it takes, and each mistake reported as
``FILE:LINE: shared_limits.redis.KEY: message``; and a reload that changes it is refused
as needing a restart."""

from __future__ import annotations

import attrs

from promgate.config.model import RedisLimits, SharedLimits
from promgate.reload import restart_needed
from promgate.testing.configs import ProblemAssertions


class SharedLimitsConfigTests(ProblemAssertions):
    def test_absent(self) -> None:
        """Without the section, limits stay per process."""
        self.tree.standard()
        config, errors, _ = self.tree.check()
        self.assertEqual(errors, [])
        assert config is not None
        self.assertIsNone(config.shared_limits)

    def test_defaults(self) -> None:
        self.tree.standard()
        self.tree.write(
            "conf.d/shared.yaml", 'shared_limits: {redis: {endpoint: "tcp:127.0.0.1:6379"}}\n'
        )
        config, errors, _ = self.tree.check()
        self.assertEqual(errors, [])
        assert config is not None
        self.assertEqual(
            config.shared_limits, SharedLimits(RedisLimits(endpoint="tcp:127.0.0.1:6379"))
        )
        redis = RedisLimits(endpoint="x")
        self.assertEqual(
            (redis.key_prefix, redis.timeout, redis.on_unavailable, redis.lease_ttl),
            ("promgate:", 0.05, "local", 30.0),
        )

    def test_everything(self) -> None:
        """Every key, the password read from its file (and kept out of repr)."""
        self.tree.standard()
        secret = self.tree.write("redis.pass", "s3cret\n")
        secret.chmod(0o600)
        self.tree.write(
            "conf.d/shared.yaml",
            """\
            shared_limits:
              redis:
                endpoint: "tls:redis.example.org:6380"
                password_file: ../redis.pass
                key_prefix: "gw:"
                timeout: 20ms
                on_unavailable: deny
                lease_ttl: 10s
            """,
        )
        config, errors, _ = self.tree.check()
        self.assertEqual(errors, [])
        assert config is not None and config.shared_limits is not None
        redis = config.shared_limits.redis
        assert redis.password_file is not None
        self.assertEqual(redis.password_file.resolve(), secret.resolve())
        self.assertEqual(
            attrs.astuple(attrs.evolve(redis, password_file=secret)),
            ("tls:redis.example.org:6380", secret, "s3cret", "gw:", 0.02, "deny", 10.0, None),
        )
        self.assertNotIn("s3cret", repr(redis))
        self.assertEqual(redis.where, "tls:redis.example.org:6380")

    def test_sentinel(self) -> None:
        """Redis named by its sentinels: their addresses, the master's name, and the
        sentinels' own password; ``password_file`` beside it is the master's."""
        self.tree.standard()
        for name in ("redis.pass", "sentinel.pass"):
            self.tree.write(name, f"{name}-secret\n").chmod(0o600)
        self.tree.write(
            "conf.d/shared.yaml",
            """\
            shared_limits:
              redis:
                sentinel:
                  endpoints: ["10.0.0.1:26379", "sentinel-b.example.org:26379", "[fd00::3]:26379"]
                  master: promgate
                  password_file: ../sentinel.pass
                password_file: ../redis.pass
            """,
        )
        config, errors, _ = self.tree.check()
        self.assertEqual(errors, [])
        assert config is not None and config.shared_limits is not None
        redis = config.shared_limits.redis
        assert redis.sentinel is not None
        self.assertIsNone(redis.endpoint)
        self.assertEqual(
            redis.sentinel.endpoints,
            (("10.0.0.1", 26379), ("sentinel-b.example.org", 26379), ("fd00::3", 26379)),
        )
        self.assertEqual(redis.sentinel.master, "promgate")
        self.assertEqual(
            (redis.password, redis.sentinel.password), ("redis.pass-secret", "sentinel.pass-secret")
        )
        self.assertNotIn("secret", repr(redis))
        self.assertEqual(
            redis.where,
            "master 'promgate' of sentinels "
            "10.0.0.1:26379,sentinel-b.example.org:26379,fd00::3:26379",
        )
        # One address alone is a list of one.
        self.tree.write(
            "conf.d/shared.yaml",
            'shared_limits: {redis: {sentinel: {endpoints: "127.0.0.1:26379", master: m}}}\n',
        )
        config, errors, _ = self.tree.check()
        self.assertEqual(errors, [])
        assert config is not None and config.shared_limits is not None
        assert config.shared_limits.redis.sentinel is not None
        self.assertEqual(config.shared_limits.redis.sentinel.endpoints, (("127.0.0.1", 26379),))

    def test_sentinel_mistakes(self) -> None:
        name = "conf.d/shared.yaml"
        errors = self.errors_with(
            name,
            """\
            shared_limits:
              redis:
                sentinel:
                  endpoints: ["127.0.0.1", "h:26379", "h:26379", 7]
                  password_file: missing.pass
                  bogus: 1
            """,
        )
        line = self.tree.line
        key = "shared_limits.redis.sentinel"
        self.assertProblem(
            errors, name, line(name, "sentinel"), key, "missing required key 'master'"
        )
        self.assertProblem(
            errors, name, line(name, "endpoints"), f"{key}.endpoints[0]", "give HOST:PORT"
        )
        self.assertProblem(errors, name, line(name, "endpoints"), f"{key}.endpoints[2]", "twice")
        self.assertProblem(
            errors, name, line(name, "endpoints"), f"{key}.endpoints[3]", "non-empty string"
        )
        self.assertProblem(
            errors, name, line(name, "password_file"), f"{key}.password_file", "does not exist"
        )
        self.assertProblem(errors, name, line(name, "bogus"), f"{key}.bogus", "unknown key")
        for text in (
            "shared_limits: {redis: "
            '{endpoint: "tcp:h:1", sentinel: {endpoints: [h:1], master: m}}}\n',
            "shared_limits: {redis: {key_prefix: x}}\n",
        ):
            errors = self.errors_with(name, text)
            self.assertProblem(
                errors, name, 1, "shared_limits.redis", "give either 'endpoint' or 'sentinel'"
            )

    def test_mistakes(self) -> None:
        name = "conf.d/shared.yaml"
        errors = self.errors_with(
            name,
            """\
            shared_limits:
              redis:
                endpoint: "tcpx:localhost:6379"
                password_file: missing.pass
                timeout: 5
                on_unavailable: maybe
                bogus: 1
            """,
        )
        line = self.tree.line
        self.assertProblem(
            errors,
            name,
            line(name, "endpoint"),
            "shared_limits.redis.endpoint",
            "invalid client endpoint 'tcpx:localhost:6379'",
        )
        self.assertProblem(
            errors,
            name,
            line(name, "password_file"),
            "shared_limits.redis.password_file",
            "does not exist",
        )
        self.assertProblem(
            errors, name, line(name, "timeout"), "shared_limits.redis.timeout", "duration"
        )
        self.assertProblem(
            errors,
            name,
            line(name, "on_unavailable"),
            "shared_limits.redis.on_unavailable",
            "must be one of: local, allow, deny",
        )
        self.assertProblem(
            errors, name, line(name, "bogus"), "shared_limits.redis.bogus", "unknown key"
        )

    def test_timeout_and_lease(self) -> None:
        name = "conf.d/shared.yaml"
        errors = self.errors_with(
            name,
            'shared_limits: {redis: {endpoint: "tcp:h:1", timeout: 5s, lease_ttl: 10s}}\n',
        )
        self.assertProblem(
            errors,
            name,
            1,
            "shared_limits.redis.timeout",
            "timeout must be at most a third of lease_ttl",
        )
        errors = self.errors_with(
            name, 'shared_limits: {redis: {endpoint: "tcp:h:1", lease_ttl: 500ms}}\n'
        )
        self.assertProblem(errors, name, 1, "shared_limits.redis.lease_ttl", "must be at least 1s")

    def test_missing_redis(self) -> None:
        errors = self.errors_with("conf.d/shared.yaml", "shared_limits: {}\n")
        self.assertProblem(
            errors, "conf.d/shared.yaml", 1, "shared_limits", "missing required key 'redis'"
        )


class ReloadTests(ProblemAssertions):
    def test_change_takes_a_restart(self) -> None:
        self.tree.standard()
        old, _, _ = self.tree.check()
        assert old is not None
        new = attrs.evolve(old, shared_limits=SharedLimits(RedisLimits(endpoint="tcp:h:1")))
        (problem,) = restart_needed(old, new)
        self.assertIn("shared_limits: changing shared limits takes a restart", problem)
        self.assertEqual(restart_needed(new, new), [])
