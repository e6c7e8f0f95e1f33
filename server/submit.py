"""Submit a run and watch it to its end; the exit status says how it ended.

    python -m server.submit CONNECTION --run-config 'key=value ...'   # e.g. connection fedllm

``flwr run --stream`` exits 0 whatever happened to the run, and a ServerApp that stops with one of
fedllm's one-line errors (a refused resume, a run that trained nothing) shows it inside Flower's
traceback. This command submits with ``flwr run`` (the project's app, from any folder), streams
the run's log (``flwr log --stream``) with such a traceback replaced by its one line, then asks the
SuperLink how the run ended (``flwr ls``): exit 0 for ``finished:completed``; otherwise one line
``fedllm: run ID finished:failed: <why>`` and exit 1; exit 2 when ``flwr run`` refused the
submission. Ctrl-C stops watching, not the run (``flwr stop ID CONNECTION`` stops it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent  # a source checkout or editable install
if not (PROJECT / "pyproject.toml").is_file():  # installed into site-packages: run from the project
    PROJECT = Path.cwd()
# fedllm's errors whose message is the whole story (server/resume.py, server/outcome.py)
ONE_LINE_ERRORS = ("server.resume.ResumeError: ", "server.outcome.RunFailed: ")
FAILED_PREFIX = "ServerApp failed with exception: "
TRACEBACK = "Traceback (most recent call last):"
CHAINED = ("During handling of the above exception", "The above exception was the direct cause")


def fold_tracebacks(lines: Iterable[str]) -> Iterator[str]:
    """The lines, with each traceback that ends in one of ``ONE_LINE_ERRORS`` replaced by
    ``fedllm: <its message>``; any other traceback passes unchanged."""
    held: list[str] = []
    for line in lines:
        if not held and not line.startswith(TRACEBACK):
            yield line
            continue
        held.append(line)
        text = line.rstrip("\n")
        if line.startswith((" ", "\t", TRACEBACK)) or not text or text.startswith(CHAINED):
            continue  # frames, or a chained traceback that goes on
        known = next((p for p in ONE_LINE_ERRORS if text.startswith(p)), None)
        if known is None:
            yield from held  # another error: shown as Flower printed it
        else:
            yield f"fedllm: {text[len(known) :]}\n"
        held = []
    yield from held


def _flwr(*args: str, app: Path) -> dict:
    """``flwr ARGS --format json``, parsed (its error message when it printed none)."""
    out = subprocess.run(["flwr", *args, "--format", "json"], cwd=app, capture_output=True, text=True)
    try:
        return json.loads(out.stdout)
    except json.JSONDecodeError:
        return {"success": False, "error-message": (out.stdout + out.stderr).strip()[-500:]}


def run_status(connection: str, run_id: str, app: Path, wait: float = 60) -> tuple[str, str]:
    """(status, details) of the run, waiting up to ``wait`` seconds for it to finish."""
    deadline = time.monotonic() + wait
    status, details = "unknown", ""
    while True:
        runs = _flwr("ls", connection, "--run-id", run_id, app=app).get("runs", [])
        if runs:
            status, details = runs[0]["status"], runs[0].get("status-details", "")
        if status.startswith("finished") or time.monotonic() > deadline:
            return status, details
        time.sleep(2)


def submit(connection: str, run_config: str, app: Path, federation_config: str | None = None) -> int:
    """Submit, stream the log, report the end; the exit status (0 completed, 1 not, 2 refused)."""
    extra = ["--federation-config", federation_config] if federation_config else []
    answer = _flwr("run", str(app), connection, *extra, "--run-config", run_config, app=app)
    if not answer.get("success"):
        print(
            f"fedllm: flwr run refused the submission: {answer.get('error-message', answer)}", file=sys.stderr
        )
        return 2
    run_id = str(answer["run-id"])
    print(f"fedllm: run {run_id} submitted to {connection}; its log follows", flush=True)
    stream = subprocess.Popen(
        ["flwr", "log", run_id, connection, "--stream"], cwd=app, stdout=subprocess.PIPE, text=True
    )
    assert stream.stdout is not None  # stdout=PIPE
    for line in fold_tracebacks(stream.stdout):
        sys.stdout.write(line)
        sys.stdout.flush()
    stream.wait()
    status, details = run_status(connection, run_id, app)
    if status == "finished:completed":
        print(f"fedllm: run {run_id} finished:completed")
        return 0
    why = details.removeprefix(FAILED_PREFIX) or "see the log above"
    print(f"fedllm: run {run_id} {status}: {why}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> None:
    """Command-line entry."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("connection", help="the flwr connection (a [superlink.NAME] in Flower's config.toml)")
    parser.add_argument("--run-config", default="", help="run config overrides: 'key=value key2=\"text\"'")
    parser.add_argument("--federation-config", help="flwr's --federation-config (simulation connections)")
    parser.add_argument("--app", type=Path, default=PROJECT, help="the Flower app folder (default: fedllm's)")
    args = parser.parse_args(argv)
    try:
        code = submit(args.connection, args.run_config, args.app.resolve(), args.federation_config)
    except KeyboardInterrupt:
        print(
            "fedllm: stopped watching; the run goes on (flwr stop RUN_ID CONNECTION stops it)",
            file=sys.stderr,
        )
        code = 130
    raise SystemExit(code)


if __name__ == "__main__":
    main()
