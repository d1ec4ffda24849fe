#!/usr/bin/env bash
# Checks the monitoring files with Prometheus's own tool (Debian: apt-get install prometheus):
#   - the alert rules parse (promtool check rules) and their unit tests pass (promtool test rules);
#   - every query of the Grafana dashboard parses as PromQL: each becomes a recording rule in a
#     scratch file, with Grafana's variables replaced by values, and promtool checks that file.
# The metric names they use are checked against what guestd exports by a Rust test
# (src/metrics.rs, dashboard_alerts_and_docs_name_only_exported_metrics).
set -euo pipefail
cd "$(dirname "$0")"
promtool check rules guestd-alerts.yml
promtool test rules guestd-alerts.test.yml
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
python3 - ../grafana/guestd-dashboard.json > "$scratch/dashboard-queries.yml" <<'PY'
import json, sys
dash = json.load(open(sys.argv[1]))
subst = {"$__rate_interval": "5m", "$__range": "6h", "$instance": ".*", "$job": "guestd"}
print("groups:\n  - name: dashboard\n    rules:")
n = 0
for panel in dash["panels"]:
    for target in panel.get("targets", []):
        expr = target["expr"]
        for k, v in subst.items():
            expr = expr.replace(k, v)
        n += 1
        print(f"      - record: dashboard:query_{n}")
        print(f"        expr: {json.dumps(expr)}")
if n == 0:
    sys.exit("the dashboard has no queries")
PY
promtool check rules "$scratch/dashboard-queries.yml"
