"""The launcher's rules without processes: the table, the port line, the environment, output."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

from shop.launcher import cli
from shop.launcher.console import Console
from shop.launcher.services import (
    SERVICES,
    ServicesFileError,
    ServiceSpec,
    load_services_file,
    parse_scale,
    runnable,
    scaled,
    with_ports,
)
from shop.launcher.settings import (
    LauncherSettings,
    child_environment,
    registry_clients,
    service_clients,
    with_credentials,
)
from shop.launcher.supervisor import (
    LineSplitter,
    RestartBudget,
    RestartPolicy,
    describe_exit,
    parse_listening,
)
from tests.support import ManualClock


@pytest.mark.parametrize(
    ("line", "url"),
    [
        (
            "2025-11-25 16:24:00,123 INFO  shop: auth-service listening on http://127.0.0.1:40123",
            "http://127.0.0.1:40123",
        ),
        ("api-gateway listening on http://0.0.0.0:8765", "http://127.0.0.1:8765"),
        ("registry listening on http://:::8761", "http://[::1]:8761"),
        ("registry listening on http://[::1]:8761/", "http://[::1]:8761"),
        ("x listening on http://shop.local:81 (pid 3)", "http://shop.local:81"),
        # The production profile's JSON line (platform/logs.py).
        (
            '{"level": "INFO", "message": "order-service listening on http://0.0.0.0:8080"}',
            "http://127.0.0.1:8080",
        ),
    ],
)
def test_the_listening_line_gives_a_url_reachable_from_here(line: str, url: str) -> None:
    assert parse_listening(line) == url


@pytest.mark.parametrize(
    "line",
    [
        "Uvicorn running on http://127.0.0.1:8000",
        "listening on http://127.0.0.1:port",
        "listening on https://127.0.0.1:443",
        "",
    ],
)
def test_other_lines_announce_nothing(line: str) -> None:
    assert parse_listening(line) is None


def test_exits_are_described_for_people() -> None:
    assert describe_exit(3) == "exit code 3"
    assert describe_exit(-9) == "killed by SIGKILL"
    assert describe_exit(None) == "still running"


def test_the_table_starts_the_registry_gateway_and_services_on_their_ports() -> None:
    assert [(s.name, s.module, s.port, s.port_env, s.role) for s in SERVICES[:3]] == [
        ("registry", "shop.registry", 8761, "REGISTRY_PORT", "registry"),
        ("gateway", "shop.gateway", 8765, "GATEWAY_PORT", "gateway"),
        ("auth", "shop.auth", 0, "AUTH_PORT", "auth"),
    ]
    services = SERVICES[2:]
    assert all(s.role in ("auth", "service") and s.port == 0 for s in services)
    assert all(s.module == f"shop.{s.name}" for s in services)
    assert SERVICES[2].argv() == (sys.executable, "-m", "shop.auth")


def test_a_service_whose_package_is_not_written_yet_is_left_out() -> None:
    written = ServiceSpec(name="launcher", module="shop.launcher")
    unwritten = ServiceSpec(name="product", module="shop.no_such_service")
    stand_in = ServiceSpec(name="fake", command=("true",))
    present, missing = runnable([written, unwritten, stand_in])
    assert present == [written, stand_in]
    assert missing == [unwritten]


def test_ports_are_overridden_by_role() -> None:
    table = with_ports(SERVICES, registry=0, gateway=18765)
    assert [s.port for s in table] == [0, 18765] + [0] * (len(SERVICES) - 2)
    assert with_ports(SERVICES) == list(SERVICES)


def test_a_services_file_replaces_the_table(tmp_path: Path) -> None:
    path = tmp_path / "services.json"
    path.write_text(
        json.dumps(
            [
                {"name": "registry", "command": ["reg", "--x"], "port": 0, "role": "registry"},
                {"name": "auth", "module": "shop.auth"},
            ]
        )
    )
    registry, auth = load_services_file(path)
    assert registry.command == ("reg", "--x")
    assert registry.role == "registry"
    assert auth == ServiceSpec(name="auth", module="shop.auth")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[{", "Invalid JSON"),
        ('[{"name": "auth"}]', "needs exactly one of module or command"),
        ('[{"name": "auth", "module": "a", "command": ["b"]}]', "exactly one of"),
        ('[{"name": "auth", "module": "a", "port": 70000}]', "out of range"),
        ('[{"name": "my auth", "module": "a"}]', "must be one word"),
        ('[{"name": "auth", "module": "a", "role": "boss"}]', "role"),
        ('[{"name": "a", "module": "a"}, {"name": "a", "module": "b"}]', "unique: a"),
        (
            '[{"name": "a", "module": "a", "role": "registry"},'
            ' {"name": "b", "module": "b", "role": "registry"}]',
            "only one service may have the role 'registry'",
        ),
        ("[]", "empty"),
    ],
)
def test_a_bad_services_file_is_refused_with_the_reason(
    tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "services.json"
    path.write_text(content)
    with pytest.raises(ServicesFileError, match=message):
        load_services_file(path)


def test_a_missing_services_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ServicesFileError, match="cannot read"):
        load_services_file(tmp_path / "nope.json")


def test_children_get_the_embedded_profile_and_an_absolute_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    base = {"PATH": "/bin", "SHOP_DATA_DIR": "elsewhere"}
    env = child_environment(base, data_dir=Path(".data"), profile="embedded")
    assert env["SHOP_PROFILE"] == "embedded"
    assert env["SHOP_DATA_DIR"] == str(tmp_path.resolve() / ".data")
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["PATH"] == "/bin"
    assert base == {"PATH": "/bin", "SHOP_DATA_DIR": "elsewhere"}


def test_each_run_makes_one_secret_per_internal_caller_unless_the_operator_gave_them() -> None:
    first = child_environment(
        {}, data_dir=Path(".data"), profile="embedded", internal_callers=["order-service"]
    )
    second = child_environment(
        {}, data_dir=Path(".data"), profile="embedded", internal_callers=["order-service"]
    )
    given = child_environment(
        {"AUTH_SERVICE_CLIENTS": '{"order-service": "from-vault"}'},
        data_dir=Path(".data"),
        profile="embedded",
        internal_callers=["order-service"],
    )
    table = service_clients(first)
    assert set(table) == {"order-service"} and len(table["order-service"]) >= 32
    assert table != service_clients(second)
    assert service_clients(given) == {"order-service": "from-vault"}
    assert "SHOP_SERVICE_SECRET" not in first, "no secret shared by every process"


def test_a_malformed_service_client_table_is_refused_without_showing_it() -> None:
    with pytest.raises(ValueError, match="JSON object") as refused:
        service_clients({"AUTH_SERVICE_CLIENTS": '["hunter2"]'})
    assert "hunter2" not in str(refused.value)


def test_the_table_says_who_makes_internal_calls_and_pins_auth() -> None:
    by_name = {s.name: s for s in SERVICES}
    assert [s.name for s in SERVICES if s.calls_internal] == ["order"]
    assert by_name["auth"].role == "auth" and by_name["auth"].port_env == "AUTH_PORT"
    with pytest.raises(ValueError, match="auth runs once"):
        scaled(SERVICES, {"auth": 2})
    with pytest.raises(ValueError, match="needs a name"):
        ServiceSpec(name="x", module="shop.x", calls_internal=True)


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REGISTRY_PORT", "18761")
    monkeypatch.setenv("GATEWAY_PORT", "0")
    monkeypatch.setenv("AUTH_ADMIN_EMAIL", "boss@shop.test")
    monkeypatch.delenv("AUTH_ADMIN_PASSWORD", raising=False)
    settings = LauncherSettings()
    assert (settings.registry_port, settings.gateway_port) == (18761, 0)
    assert settings.admin_email == "boss@shop.test"
    assert settings.admin_password == "admin-password"


def test_output_lines_are_prefixed_with_the_padded_service_name() -> None:
    stream = io.StringIO()
    console = Console(stream, names=["registry", "auth"])
    console.service_lines("registry", ["up and running"])
    console.service_lines("auth", [""])
    console.note("all good")
    assert stream.getvalue().splitlines() == [
        "registry     | up and running",
        "auth         | ",
        "launcher     | all good",
    ]
    assert "\033" not in stream.getvalue()


def test_a_long_service_name_widens_every_prefix() -> None:
    stream = io.StringIO()
    console = Console(stream, names=["notification-service", "auth"])
    console.service_lines("auth", ["x", "y"])
    assert stream.getvalue() == "auth                 | x\nauth                 | y\n"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_colour_is_used_at_a_terminal_unless_no_color_is_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    stream = _Terminal()
    console = Console(stream, names=["registry", "auth"])
    console.service_lines("registry", ["hi"])
    console.service_lines("auth", ["hi"])
    console.banner("auth crashed")
    first, second, *banner = stream.getvalue().splitlines()
    assert first.startswith("\033[36mregistry     |\033[0m")
    assert second.startswith("\033[32mauth         |\033[0m")
    assert "\033[1;31m!! auth crashed\033[0m" in banner
    monkeypatch.setenv("NO_COLOR", "1")
    assert not Console(_Terminal()).colour


def test_bad_flags_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["up", "--registry-port", "70000"])
    assert exited.value.code == 2
    assert "70000 is not between 0 and 65535" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["up", "--ready-timeout", "0"])
    assert "must be more than 0 seconds" in capsys.readouterr().err


def test_bad_settings_in_the_environment_are_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GATEWAY_PORT", "lots")
    assert cli.main(["up"]) == 2
    assert "GATEWAY_PORT" in capsys.readouterr().err


def test_nothing_to_start_is_a_failure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "services.json"
    path.write_text(json.dumps([{"name": "product", "module": "shop.no_such_service"}]))
    assert cli.main(["up", "--services-file", str(path)]) == 1
    out = capsys.readouterr().out
    assert "skipping product: shop.no_such_service has no __main__ yet" in out
    assert "no service to start" in out


def test_production_secrets_come_from_the_operator_never_from_the_launcher() -> None:
    env = child_environment({}, data_dir=Path(".data"), profile="production")
    assert env["SHOP_PROFILE"] == "production"
    assert "SHOP_SERVICE_SECRET" not in env, "the services refuse to start without one"
    assert "AUTH_SERVICE_CLIENTS" not in env


def test_scale_names_each_instance_and_keeps_the_table_order() -> None:
    table = scaled(SERVICES, parse_scale("order=2, notification=3,inventory=1"))
    names = [s.name for s in table]
    assert names == [
        "registry",
        "gateway",
        "auth",
        "product",
        "inventory",
        "order-1",
        "order-2",
        "notification-1",
        "notification-2",
        "notification-3",
        "web",
    ]
    assert {s.module for s in table if s.name.startswith("order")} == {"shop.order"}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("order", "not NAME=COUNT"),
        ("order=two", "not NAME=COUNT"),
        ("order=0", "give 1 to 16"),
        ("order=17", "give 1 to 16"),
        ("order=2,order=3", "given twice"),
    ],
)
def test_a_bad_scale_is_refused(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_scale(text)


@pytest.mark.parametrize(
    ("counts", "problem"),
    [({"gateway": 2}, "runs once"), ({"basket": 2}, "there is no service 'basket'")],
)
def test_only_known_services_scale(counts: dict[str, int], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        scaled(SERVICES, counts)


def test_shop_up_refuses_a_bad_scale_before_starting_anything(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["up", "--scale", "gateway=2"]) == 2
    assert "bad --scale: gateway runs once" in capsys.readouterr().err


def test_shop_up_refuses_a_bad_environment_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SHOP_HEARTBEAT_INTERVAL_S", "0")
    assert cli.main(["up"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("shop: SHOP_HEARTBEAT_INTERVAL_S: ") and err.count("\n") == 1


def test_each_service_registers_under_its_name_from_the_specification() -> None:
    assert {s.name: s.registers_as for s in SERVICES} == {
        "registry": None,
        "gateway": "api-gateway",
        "auth": "auth-service",
        "product": "product-service",
        "inventory": "inventory-service",
        "order": "order-service",
        "notification": "notification-service",
        "web": "web-service",
    }
    scaled_table = scaled(SERVICES, {"order": 2})
    assert {s.registers_as for s in scaled_table if s.name.startswith("order")} == {
        "order-service"
    }, "instances of one service share its credential"


def test_the_registry_registers_with_nobody() -> None:
    with pytest.raises(ValueError, match="registers with nobody"):
        ServiceSpec(name="registry", module="shop.registry", role="registry", registers_as="x")
    with pytest.raises(ValueError, match="no application name"):
        ServiceSpec(name="auth", module="shop.auth", registers_as="auth service")


def test_each_run_makes_one_registry_credential_per_application() -> None:
    names = ["api-gateway", "order-service", "order-service", "AUTH-SERVICE"]
    first = child_environment({}, data_dir=Path(".data"), profile="embedded", registrants=names)
    second = child_environment({}, data_dir=Path(".data"), profile="embedded", registrants=names)
    clients = registry_clients(first)
    assert set(clients) == {"api-gateway", "order-service", "auth-service"}
    assert all(len(secret) >= 32 for secret in clients.values())
    assert len(set(clients.values())) == 3
    assert clients != registry_clients(second)


def test_an_operators_registry_clients_are_kept_and_production_gets_none_invented() -> None:
    given = json.dumps({"order-service": "o" * 32})
    kept = child_environment(
        {"REGISTRY_CLIENTS": given},
        data_dir=Path(".data"),
        profile="embedded",
        registrants=["order-service", "auth-service"],
    )
    production = child_environment(
        {}, data_dir=Path(".data"), profile="production", registrants=["order-service"]
    )
    assert kept["REGISTRY_CLIENTS"] == given
    assert "REGISTRY_CLIENTS" not in production, "the registry refuses to start without them"


def test_an_operators_registry_clients_file_is_read(tmp_path: Path) -> None:
    path = tmp_path / "clients.json"
    path.write_text(json.dumps({"Order-Service": "o" * 32}))
    env = {"REGISTRY_CLIENTS_FILE": str(path)}
    assert "REGISTRY_CLIENTS" not in child_environment(
        env, data_dir=tmp_path, profile="embedded", registrants=["order-service"]
    )
    assert registry_clients(env) == {"order-service": "o" * 32}


@pytest.mark.parametrize("value", ["{not json " + "s" * 32, json.dumps({"a": ["s" * 32]})])
def test_bad_registry_clients_are_refused_without_showing_them(value: str) -> None:
    with pytest.raises(ValueError) as refused:
        registry_clients({"REGISTRY_CLIENTS": value})
    assert "s" * 32 not in str(refused.value)


def test_the_credential_goes_into_the_registry_url_percent_encoded() -> None:
    url = with_credentials("http://127.0.0.1:8761/eureka", app="order-service", secret="a/b@c:d")
    assert url == "http://order-service:a%2Fb%40c%3Ad@127.0.0.1:8761/eureka"


def test_the_zygote_is_given_no_secret_and_keeps_what_forks_cannot_change() -> None:
    from shop.launcher import settings
    from shop.launcher.zygote import SECRET_VARIABLES, zygote_environment

    names = {
        settings.REGISTRY_CLIENTS,
        settings.REGISTRY_CLIENTS_FILE,
        settings.SERVICE_CLIENTS,
        settings.SERVICE_SECRET,
    }
    assert set(SECRET_VARIABLES) == names
    env = zygote_environment({**dict.fromkeys(names, "s" * 32), "PYTHONPATH": "/x"})
    assert not names & set(env)
    assert env["PYTHONPATH"] == "/x" and env["MALLOC_ARENA_MAX"] == "2"
    assert env["MALLOC_MMAP_THRESHOLD_"] == "1048576"
    assert zygote_environment({"MALLOC_ARENA_MAX": "8"})["MALLOC_ARENA_MAX"] == "8"


def test_restarts_back_off_doubling_and_give_up_past_the_limit_within_the_window() -> None:
    clock = ManualClock()
    budget = RestartBudget(RestartPolicy(limit=5, window_s=60, first_delay_s=0.5, clock=clock))
    delays = []
    for _ in range(5):
        delays.append(budget.crashed())
        clock.advance(1)
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0]
    assert budget.crashed() is None, "a sixth crash within a minute: give up"


def test_the_backoff_is_capped_and_old_crashes_are_forgotten() -> None:
    clock = ManualClock()
    policy = RestartPolicy(limit=10, window_s=60, first_delay_s=0.5, max_delay_s=10, clock=clock)
    budget = RestartBudget(policy)
    assert [budget.crashed() for _ in range(7)][-3:] == [8.0, 10.0, 10.0]
    clock.advance(61)
    assert budget.crashed() == 0.5, "a crash after a quiet minute starts the backoff again"
    assert budget.crashes == 1


def test_no_restarts_is_fail_fast_and_a_nonsense_policy_is_refused() -> None:
    assert RestartBudget(RestartPolicy(limit=0)).crashed() is None
    with pytest.raises(ValueError, match="not a restart policy"):
        RestartPolicy(first_delay_s=20, max_delay_s=10)


def test_each_service_is_told_its_port_so_a_restart_gets_the_same_one() -> None:
    ports = {s.name: s.port_env for s in SERVICES}
    assert ports == {
        "registry": "REGISTRY_PORT",
        "gateway": "GATEWAY_PORT",
        "auth": "AUTH_PORT",
        "product": "PRODUCT_PORT",
        "inventory": "INVENTORY_PORT",
        "order": "ORDER_PORT",
        "notification": "NOTIFICATION_PORT",
        "web": "WEB_PORT",
    }


@pytest.mark.parametrize("value", ["-1", "x", "101"])
def test_a_bad_restart_limit_is_refused(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as refused:
        cli.main(["up", "--max-restarts", value])
    assert refused.value.code == 2
    assert "--max-restarts" in capsys.readouterr().err


def test_output_is_cut_into_whole_lines_whatever_the_reads_bring() -> None:
    lines = LineSplitter(limit=8)
    assert lines.feed(b"one\ntw") == ["one"]
    assert lines.feed(b"o\r\nthree\nfo") == ["two", "three"]
    assert lines.feed(b"ur is far too long") == ["[a line longer than 8 bytes was cut]"]
    assert lines.feed(b" still\nfive\n") == ["five"]
    assert lines.feed(b"six") == []
    assert lines.end() == ["six"]
    assert lines.end() == []
