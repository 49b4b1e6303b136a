"""The deployment files: what can be checked without a container engine (none can pull images here)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import yaml

from pipeline import load_config
from tests.support.procs import ROOT

DEPLOY = ROOT / "deploy"


def readme_run_command() -> list[str]:
    """The README's first command (the one that runs framegrid), as words."""
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block
    first = block.group(1).splitlines()[0].split("#")[0]
    return shlex.split(first)


def dockerfile_command(path: Path) -> list[str]:
    text = path.read_text()
    entry = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1))  # type: ignore[union-attr]
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))  # type: ignore[union-attr]
    return [*entry, *cmd]


def test_images_run_the_readme_command_and_set_up_as_the_readme_does() -> None:
    run = readme_run_command()
    assert run == ["tools/run"]
    for name in ("Dockerfile.cpu", "Dockerfile.cuda"):
        text = (DEPLOY / name).read_text()
        assert dockerfile_command(DEPLOY / name) == [*run, "/config/config.toml"], name
        assert "RUN tools/bootstrap run" in text, name  # the set-up tools/run would do, done at build time
        assert (ROOT / "tools" / "run").is_file()
        assert (ROOT / "tools" / "bootstrap").is_file()


def test_compose_file_parses_and_every_file_it_names_exists() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"framegrid", "framegrid-talk", "mosquitto", "prometheus", "grafana"}
    assert services["framegrid-talk"]["profiles"] == ["talk"]  # talking heads, on request
    build = services["framegrid"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in compose["volumes"], f"{name}: volume {source} is not declared"
    for secret in services["prometheus"]["secrets"]:
        assert secret in compose["secrets"]
    assert services["framegrid"]["environment"]["FRAMEGRID_TOKEN"].startswith("${FRAMEGRID_TOKEN")
    # Prometheus reads the token the compose file hands it, where its config says
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    job = prom["scrape_configs"][0]
    assert job["authorization"]["credentials_file"] == "/run/secrets/framegrid_token"
    assert job["static_configs"][0]["targets"] == ["framegrid:8080"]
    # Grafana: the provisioned dashboard folder is where the dashboard is mounted
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/framegrid.yml").read_text())
    mounted = {v.split(":")[1]: v.split(":")[0] for v in services["grafana"]["volumes"]}
    folder = provider["providers"][0]["options"]["path"]
    assert (DEPLOY / mounted[folder] / "framegrid.json").is_file()
    source = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    dash = json.loads((DEPLOY / "grafana/dashboards/framegrid.json").read_text())
    assert {t["datasource"]["uid"] for p in dash["panels"] for t in p["targets"]} == {
        source["datasources"][0]["uid"]}


def test_the_stack_config_is_valid_and_exposes_the_api_only_with_a_token() -> None:
    config = load_config(DEPLOY / "config.toml", env={"FRAMEGRID_TOKEN": "t0ken"}, check_files=False)
    assert config.api.listen == "0.0.0.0:8080"
    talk = load_config(DEPLOY / "talk.toml", env={"FRAMEGRID_TOKEN": "t0ken"}, check_files=False)
    assert talk.api.token is not None
    assert [str(d) for d in talk.api.media_dirs or []] == ["/media"]
    assert config.api.token is not None
    assert config.mqtt.url == "mqtt://mosquitto:1883"
    assert Path(config.models["shapes"].weights).name == (ROOT / "models" / "shapes-yolo11n.pt").name
    assert (ROOT / "media" / Path(config.streams["demo"].url).name).is_file()
