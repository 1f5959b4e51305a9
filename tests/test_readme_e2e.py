"""The README's examples run as written against a real switch, and end: the clients, the SDK, the admin CLI."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import trio

from perf import procs
from tests.daemons import base_env
from tests.stack import open_stack

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
VENV = Path(sys.executable).parent.parent


async def _run(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str, str]:
    with trio.fail_after(60):  # a snippet that never ends fails here
        done = await trio.run_process(argv, env=env, cwd=cwd, capture_stdout=True, capture_stderr=True, check=False)
    return done.returncode, done.stdout.decode(), done.stderr.decode()


async def test_readme_client_and_sdk_snippets_run_as_written_and_end(tmp_path: Path) -> None:
    client, sdk = re.findall(r"```python\n(.*?)```", README, re.S)[:2]
    async with open_stack(tmp_path) as stack, procs.sim(tmp_path, "--fast") as sim:
        _, key = await stack.account()
        async with stack.switchd(f"{sim.address}/v1/realtime?model=gpt-realtime") as switch:
            address = switch.address.split("://", 1)[1]
            for name, snippet, expected in (("client", client, "response.done"), ("sdk", sdk, "usage:")):
                path = tmp_path / f"{name}.py"
                path.write_text(snippet.replace("127.0.0.1:3000", address), encoding="utf-8")
                code, out, err = await _run([sys.executable, str(path)], base_env(RS_KEY=key), tmp_path)
                assert code == 0, f"README's {name} snippet failed: {err}"
                assert expected in out and out.rstrip().splitlines()[-1].startswith(expected.split(":")[0])


async def test_readme_cli_block_runs_from_the_repository_shell(tmp_path: Path) -> None:
    block = re.search(r"```sh\n(export DB_PATH=.*?)```", README, re.S)
    assert block is not None
    repo = tmp_path / "repo"  # what the README's shell sees: .venv/ and make run's var/
    repo.mkdir()
    (repo / ".venv").symlink_to(VENV)
    (repo / "var").symlink_to(tmp_path)
    async with open_stack(tmp_path) as stack:
        await stack.cli("seed")
        code, out, err = await _run(["bash", "-e", "-c", block.group(1)], base_env(), repo)
    assert code == 0, f"README's CLI block failed: {err}"
    assert "demo@realtime-switch.local" in out and "revoked rsk_" in out and "answered in" in out
