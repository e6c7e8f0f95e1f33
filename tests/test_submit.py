"""``python -m server.submit``: fedllm's one-line errors replace Flower's traceback; others pass."""

from __future__ import annotations

from server.submit import fold_tracebacks


def _traceback(last: str) -> list[str]:
    return [
        "Traceback (most recent call last):\n",
        '  File "/x/run_serverapp.py", line 221, in run_serverapp\n',
        "    context = run_(\n",
        "              ^^^^^\n",
        last,
    ]


def test_a_refused_resume_is_one_line():
    lines = [
        "\x1b[91mERROR \x1b[0m:     ServerApp raised an exception\n",
        *_traceback("server.resume.ResumeError: run config resume='first': it holds result.json\n"),
        "after\n",
    ]
    assert list(fold_tracebacks(lines)) == [
        lines[0],
        "fedllm: run config resume='first': it holds result.json\n",
        "after\n",
    ]


def test_a_chained_one_line_error_keeps_its_cause_and_folds_itself():
    chained = [
        *_traceback("KeyError: 'x'\n"),
        "\n",
        "During handling of the above exception, another exception occurred:\n",
        "\n",
        *_traceback("server.outcome.RunFailed: round 1 of 8: no site's update was aggregated\n"),
    ]
    assert list(fold_tracebacks(chained)) == [
        *chained[:8],  # the cause, as Python printed it
        "fedllm: round 1 of 8: no site's update was aggregated\n",
    ]


def test_any_other_traceback_is_shown_whole():
    lines = _traceback("ValueError: something else\n")
    assert list(fold_tracebacks(["a\n", *lines, "b\n"])) == ["a\n", *lines, "b\n"]
