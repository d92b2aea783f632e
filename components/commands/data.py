"""`m1 data curate`: run the curate stage and print where its outputs went."""
from __future__ import annotations


def _curate(args) -> int:
    from components.config import load_config
    from components.data import curate

    cfg = load_config(args.profile, args.params)
    out = curate.run(cfg)
    rows = [(name, out.records.get(name, ""), out.rows.get(name, ""), out.tokens.get(name, ""))
            for name in out.records]
    w = max(len(r[0]) for r in rows) if rows else 10
    print(f"{'output':<{w}}  {'records':>8}  {'rows':>6}  {'tokens':>9}")
    for name, rec, nrows, ntok in rows:
        print(f"{name:<{w}}  {rec:>8}  {nrows!s:>6}  {ntok!s:>9}")
    print(f"rejected {out.rejected} (see {out.rejects}), duplicates {out.duplicates}, "
          f"decontaminated {out.decontaminated} (see {out.decontamination})")
    print(f"outputs in {out.data_dir} (manifest {out.manifest.name}, report {out.report_md.name}) "
          f"in {out.seconds:.1f} s")
    return 0


def register(sub) -> None:
    from components.cli import add_config_args

    p = sub.add_parser("data", help="data curation")
    dsub = p.add_subparsers(dest="data_command", required=True)
    c = dsub.add_parser("curate", help="build the SFT-1/SFT-2 packs, RL prompts and evaluation sets")
    add_config_args(c)
    c.set_defaults(func=_curate)
