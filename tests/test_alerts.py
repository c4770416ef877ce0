"""cluster/label-alerts.yaml: Prometheus alert rules that parse, name only the counters the label job exports, and
fire when they should, checked by Prometheus's own `promtool` (Debian's `prometheus` package; .ci/run installs it)
where it is installed, and by a strict schema of the rule format everywhere."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from artfuse.reporting.counters import END_STATES, prometheus_names

RULES = Path(__file__).resolve().parent.parent / "cluster" / "label-alerts.yaml"
PROMTOOL = shutil.which("promtool")
RULE_KEYS = {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
OUTPUT = "s3://museum-labels/artfuse"


def rules() -> dict[str, dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"]}


def test_the_rule_file_follows_prometheus_rule_format_strictly():
    document = yaml.safe_load(RULES.read_text())
    assert set(document) == {"groups"} and document["groups"]
    names = [group["name"] for group in document["groups"]]
    assert len(names) == len(set(names))
    for group in document["groups"]:
        assert set(group) <= {"name", "interval", "limit", "rules"} and group["rules"], group.get("name")
        for rule in group["rules"]:
            assert set(rule) <= RULE_KEYS and {"alert", "expr"} <= set(rule), rule
            assert NAME.match(rule["alert"]) and isinstance(rule["expr"], str) and rule["expr"].strip()
            for key in ("labels", "annotations"):
                assert all(isinstance(k, str) and NAME.match(k) and isinstance(v, str) for k, v in
                           rule.get(key, {}).items()), (rule["alert"], key)  # fmt: skip
    assert set(rules()) == {"ArtfuseLabelNightFailed", "ArtfuseLabelNightLabelledNothing"}


def test_the_rules_name_only_what_the_label_job_exports():
    for name, rule in rules().items():
        used = set(re.findall(r"\bray_artfuse_\w+", rule["expr"]))
        assert used and used <= prometheus_names(), (name, used - prometheus_names())
        for state in re.findall(r'end_state=~?"([^"]+)"', rule["expr"]):
            assert set(state.split("|")) <= set(END_STATES), (name, state)


@pytest.mark.skipif(not PROMTOOL, reason="promtool is not installed (Debian's prometheus package; .ci/run installs it)")
def test_promtool_checks_the_rules():
    checked = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(rules())} rules found" in checked.stdout


def series(end_state: str | None, worker: str, values: str) -> dict:
    """One run's counter (a series of its own: Ray labels it with the driver's WorkerId), hour by hour."""
    if end_state is None:
        return {"series": f'ray_artfuse_label_rows_written_total{{output="{OUTPUT}",WorkerId="{worker}"}}',
                "values": values}  # fmt: skip
    labels = f'output="{OUTPUT}",end_state="{end_state}",WorkerId="{worker}"'
    return {"series": f"ray_artfuse_label_runs_total{{{labels}}}", "values": values}


# Hourly samples over three days; `_` is no sample. Runs end at 02:00 (hour 2, 26, 50).
STANDING = [  # one cluster for days: each run's series stays once it appeared
    series("success", "night1", "_x2 1x70"),
    series(None, "night1", "_x2 40x70"),
    series("failed", "night3", "_x50 1x22"),
]
PER_NIGHT = [  # a cluster per night, deleted an hour after the run
    series("success", "night1", "_x2 1x1"),
    series(None, "night1", "_x2 40x1"),
    series("failed", "night2-try1", "_x26 1"),  # its retry, on a new cluster, finished
    series("success", "night2-try2", "_x27 1x1"),
    series(None, "night2-try2", "_x27 12x1"),
    series("failed", "night3-try3", "_x50 1x1"),  # the night's last try failed too
]


@pytest.mark.skipif(not PROMTOOL, reason="promtool is not installed (Debian's prometheus package; .ci/run installs it)")
@pytest.mark.parametrize(
    ("inputs", "firing", "quiet"),
    [
        (
            STANDING,
            {"Failed": [52, 60], "LabelledNothing": [33, 40, 60]},
            {"Failed": [3, 27, 30, 63], "LabelledNothing": [3, 10, 28]},
        ),
        (
            PER_NIGHT,
            {"Failed": [52], "LabelledNothing": [59]},
            {"Failed": [3, 27, 30, 63], "LabelledNothing": [3, 10, 28, 33, 50]},
        ),
    ],
    ids=["a standing cluster", "a cluster per night"],
)
def test_the_rules_fire_when_a_night_failed_or_labelled_nothing(tmp_path, inputs, firing, quiet):
    """`promtool test rules` evaluates each rule's expression over made-up counters: it must fire at the hours in
    `firing` and not at those in `quiet` (a night that finished, a failed try that a retry made good)."""
    cases = []
    for alert, rule in rules().items():
        name = alert.removeprefix("ArtfuseLabelNight")
        fired = [{"labels": f'{{output="{OUTPUT}"}}' if name == "Failed" else "{}", "value": 1}]
        cases += [{"expr": rule["expr"], "eval_time": f"{hour}h", "exp_samples": fired} for hour in firing[name]]
        cases += [{"expr": rule["expr"], "eval_time": f"{hour}h", "exp_samples": []} for hour in quiet[name]]
    unit = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1h",
        "tests": [{"interval": "1h", "input_series": inputs, "promql_expr_test": cases}],
    }
    (tmp_path / "unit.yaml").write_text(yaml.safe_dump(unit))
    done = subprocess.run([PROMTOOL, "test", "rules", str(tmp_path / "unit.yaml")], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
