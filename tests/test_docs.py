"""The user's guide and .env.example keep up with the code: every setting documented, every link and snippet valid."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import attrs
import pytest

from common.config import Settings, load_settings, read_env_file

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
ENV_EXAMPLE = ROOT / ".env.example"


def _setting_keys() -> list[str]:
    return [field.name.upper() for field in attrs.fields(Settings)]


@pytest.mark.parametrize("key", _setting_keys())
def test_every_setting_is_in_the_readme_and_the_env_example(key: str) -> None:
    assert f"`{key}`" in README, f"{key} is missing from README.md's configuration table"
    example = ENV_EXAMPLE.read_text(encoding="utf-8")
    assert re.search(rf"^#? ?{key}=", example, re.M), f"{key} is missing from .env.example"


@pytest.mark.parametrize("role", ["switchd", "switchdb", "cli"])
def test_the_env_example_as_it_stands_is_a_valid_configuration(role: str, tmp_path: Path) -> None:
    values = read_env_file(ENV_EXAMPLE)
    assert values["ZMQ_SOCKET_PATH"] and values["DB_PATH"]
    # The provider key is the one thing the example cannot hold.
    settings = load_settings(role, environ={"OPENAI_API_KEY": "sk-test"}, env_file=ENV_EXAMPLE)  # type: ignore[arg-type]
    assert settings.zmq_socket_path == values["ZMQ_SOCKET_PATH"]


def test_readme_links_point_at_files_in_the_repository() -> None:
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
    assert links
    for link in links:
        if "://" not in link:
            assert (ROOT / link).exists(), f"README.md links to {link}, which is not in the repository"


def test_readme_python_snippets_parse_and_the_sdk_one_ends_after_response_done() -> None:
    snippets = re.findall(r"```python\n(.*?)```", README, re.S)
    assert len(snippets) >= 2
    for snippet in snippets:
        ast.parse(snippet)
        assert "response.done" in snippet and "break" in snippet  # a snippet that never ends is no example


def test_readme_cli_examples_run_from_the_repository_not_from_path() -> None:
    commands = re.findall(r"^(?:[A-Z]+=\$\()?(\S*switchdb) ", README, re.M)
    assert commands and all(c == ".venv/bin/switchdb" for c in commands), commands
    assert "DB_PATH=var/switch.db" in README


def test_readme_refers_to_nothing_outside_the_repository() -> None:
    assert "SPEC" not in README and "§" not in README


def test_the_readme_configuration_table_names_only_real_settings() -> None:
    table = README.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", "\n".join(
        line.split("|")[1] for line in table.splitlines() if line.startswith("| `"))))
    assert documented and documented <= set(_setting_keys()), documented - set(_setting_keys())
