"""Replication on simnet (simnet/replication_run.py) at test scale, and through the
CLI: no backup lost through churn and a whole site's loss, copies on sites other
than the author's, repair after the loss, a JSON report and PNG plots."""
from __future__ import annotations

import json

from conftest import Cli

from hypersdk.simnet.replication_run import DAY, Config, World


def test_a_site_loss_is_repaired_and_nothing_is_lost():
    cfg = Config(nodes=120, sites=6, days=8, replicas=3, site_loss_day=4, seed=3)
    w = World(cfg)
    r = w.run()
    assert r["backups"] == 120 and r["backups_lost"] == 0
    assert r["copies_lost_with_the_site_bytes"] > 0           # the loss hit copies
    assert r["repair_bytes"] > 0 and r["back_at_count_after_site_loss_h"] is not None
    for b in w.backups:                                       # the decisions' invariants
        live = [h for h, s in b.holders.items() if s == "held" and not w.dead[h]]
        assert all(w.site[h] != w.site[b.author] for h in b.holders)
        if len(live) >= 2:                                    # never all on one site
            assert len({w.site[h] for h in live}) >= 2
    assert w.now >= (cfg.days - 1) * DAY
    again = World(cfg).run()                                  # deterministic from the seed
    assert again["repair_bytes_by_day"] == r["repair_bytes_by_day"]


def test_without_churn_or_loss_nothing_is_repaired():
    r = World(Config(nodes=40, sites=4, days=3, churn=0.0, site_loss_day=99, seed=2)).run()
    assert r["repair_bytes"] == 0 and r["holders_lost"] == 0 and r["backups_lost"] == 0
    assert r["placements"] == 40 * 3 and r["under_replicated_backup_hours"] == 0


def test_the_cli_writes_the_report_and_plots(tmp_path):
    cli = Cli(tmp_path / "data")
    out = tmp_path / "rep"
    doc = cli.json("simnet", "replication", "--nodes", "60", "--sites", "5", "--days", "4",
                   "--out", out)
    assert doc["backups_lost"] == 0 and doc["config"]["nodes"] == 60
    assert json.loads((out / "replication.json").read_text())["backups"] == 60
    for png in ("repair_traffic_per_day.png", "under_replicated.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
