"""Fair compression to a tolerance: how far each configuration compresses before some group loses more than eps.

For each dataset and seed: one dense resnet18; then, for each configuration (criterion + recovery), a tolerance
search exactly as ``fairdeploy compress --criterion C [--recovery constrained] --max-group-drop EPS`` runs it
(rounds of global channel removal keeping ``--step`` of the MACs each, recovery fine-tuning after every round,
the guard on validation, stop at the first round that fails, hand on the most compressed model that passed), with
the same schedule, data order and seed for every configuration. Plain-recovery searches run once at the largest
eps: a smaller eps is the same search stopped earlier (the guard decides only where to stop, never how to train),
replayed from prune.json. Constrained searches run once per eps (eps is also their constraint), or with
``--replay-constrained`` once at the largest eps and replayed like the plain ones (the constraint then stays there). The fine-tune-only
control gets the recovery of the blind search's reached model (as many rounds of the same fine-tuning) without
pruning. Each reached model is measured ONCE on the test split.

Reported per (dataset, eps, configuration): mean over seeds with a 95 % t-interval of the MACs kept, the MAC
reduction, test worst-group accuracy (and its change against the dense model), Eodd and macro-F1; the paired
per-seed table against magnitude + plain recovery (ratio of MAC reductions, its mean and its geometric mean with
the interval of the mean log ratio, Δ test worst-group accuracy); the frontier (validation worst-group accuracy
against MACs kept, every round) as a plot; and the issue's target line, met on the mean and with the interval.
``--render RESULTS.json`` prints all of it again from an earlier run's file without training anything.

Datasets:
- ``synth``: the project's synthetic lesions (minority ``dark`` group with low-contrast lesions), as the demo.
- ``utkface``: real faces from ../shared/data/utkface-64 (skipped when absent). Task: gender; group: race.

    python benchmarks/fair_compression.py --dataset synth utkface --seeds 0 1 2 --eps 0.01 0.02
"""

from __future__ import annotations

import copy
import csv
import math
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as common

CONFIGS = ("magnitude+plain", "magnitude+constrained", "fairprune+constrained", "group-taylor+constrained",
           "fairprune+plain", "group-taylor+plain")
BLIND = "magnitude+plain"
UTKFACE = common.REPO.parent / "shared" / "data" / "utkface-64"
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def parse_args(argv: list[str] | None = None):
    p = common.base_parser(__doc__.splitlines()[0], "benchmarks/results/fair_compression_tolerance.json")
    p.add_argument("--dataset", nargs="+", default=["synth", "utkface"], choices=["synth", "utkface"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--eps", nargs="+", type=float, default=[0.01, 0.02], help="tolerances (max group drop)")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    p.add_argument("--step", type=float, default=0.7, help="MACs kept per round")
    p.add_argument("--min-fraction", type=float, default=0.05, help="the search's floor")
    p.add_argument("--max-f1-drop", type=float, default=0.05)
    p.add_argument("--synth-images", type=int, default=1200)
    p.add_argument("--synth-size", type=int, default=32)
    p.add_argument("--synth-epochs", type=int, default=10, help="dense training epochs (synth)")
    p.add_argument("--utk-images", type=int, default=12000, help="UTKFace images used (random sample)")
    p.add_argument("--utk-size", type=int, default=64)
    p.add_argument("--utk-epochs", type=int, default=6, help="dense training epochs (UTKFace)")
    p.add_argument("--finetune-epochs", type=int, default=2, help="recovery fine-tuning epochs per round")
    p.add_argument("--finetune-lr", type=float, default=5e-4)
    p.add_argument("--distill", type=float, default=0.5)
    p.add_argument("--balance", default="group", help="recovery sampling (none, class, group, group-class)")
    p.add_argument("--select", default="worst_group_accuracy", help="recovery's best-epoch metric on validation")
    p.add_argument("--dual-lr", type=float, default=None, help="constrained recovery's dual lr (default: its own)")
    p.add_argument("--replay-constrained", action="store_true",
                   help="constrained searches too run once, at the largest eps (also their constraint), and are "
                        "replayed at the smaller ones (cheaper; the constraint then stays at the largest eps)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default=None, help="folder for data and checkpoints (reused across runs)")
    p.add_argument("--plot", default="benchmarks/results/fair_compression_frontier.png")
    p.add_argument("--render", metavar="RESULTS.json", default=None,
                   help="print the tables, target lines and frontier plot again from an earlier run's results file "
                        "(nothing is trained)")
    return p.parse_args(argv)


# ---- data and dense models ------------------------------------------------------------------------------------

def utkface_manifest(work: Path, n: int, seed: int) -> Path:
    """A manifest over a random sample of UTKFace: label = gender, group = race, split 60/20/20 (stratified)."""
    import random

    from fairdeploy.data.manifest import Record, write_manifest
    from fairdeploy.data.splits import assign_splits

    out = work / f"utkface-n{n}-seed{seed}.csv"
    if out.is_file():
        return out
    with open(UTKFACE / "metadata.csv", newline="") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: r["image"])
    random.Random(seed).shuffle(rows)
    records = [Record(image=f"images/{r['image']}", label=r["gender"], group=r["race"], split="") for r in rows[:n]]
    write_manifest(assign_splits(records, (0.6, 0.2, 0.2), seed=seed), out)
    return out


def dense_checkpoint(dataset: str, work: Path, seed: int, args) -> tuple[Path, Path, Path | None]:
    """(manifest, dense checkpoint, images root)."""
    from fairdeploy.data.manifest import read_manifest
    from fairdeploy.models.checkpoint import SPEC_FILE
    from fairdeploy.training.loop import FitConfig
    from fairdeploy.training.train import train_model

    if dataset == "synth":
        manifest, ckpt = common.synthetic_checkpoint(work, seed, args.synth_images, args.synth_size,
                                                     args.synth_epochs, "cpu" if args.device == "auto" else args.device)
        return manifest, ckpt, None
    manifest = utkface_manifest(work, args.utk_images, seed)
    run = work / f"utk-resnet18-e{args.utk_epochs}-n{args.utk_images}-s{args.utk_size}-seed{seed}"
    if not (run / "best" / SPEC_FILE).is_file():
        cfg = FitConfig(epochs=args.utk_epochs, batch_size=64, lr=2e-3, seed=seed)
        train_model(read_manifest(manifest, UTKFACE), "resnet18", run, cfg, image_size=args.utk_size,
                    device=args.device)
    return manifest, run / "best", UTKFACE


def test_metrics(ckpt: Path, manifest: Path, root: Path | None, model: Any = None) -> dict[str, Any]:
    import torch

    from fairdeploy.data.loading import Encoding, eval_transform, split_dataset
    from fairdeploy.data.manifest import read_manifest
    from fairdeploy.models.checkpoint import load_checkpoint, read_spec
    from fairdeploy.models.size import model_size
    from fairdeploy.training.loop import evaluate_model

    spec = read_spec(ckpt)
    if model is None:
        model, spec = load_checkpoint(ckpt, "cpu")
    test = split_dataset(read_manifest(manifest, root), "test", Encoding(spec.classes, spec.groups),
                         eval_transform(spec.image_size, spec.mean, spec.std))
    rep = evaluate_model(model, test, spec, torch.device("cpu"))
    acc = {g: m.accuracy for g, m in rep.groups}
    return {"worst_group_accuracy": min(acc.values()), "eodd": rep.gap("eodd"), "f1_macro": rep.overall_f1_macro,
            "accuracy": rep.overall_accuracy, "group_accuracy": acc, "group_n": {g: m.n for g, m in rep.groups},
            "macs": model_size(model, spec.image_size).macs}


# ---- one search and its replay at a smaller eps -----------------------------------------------------------------

def recovery(args, constrained: bool, eps: float) -> Any:
    from fairdeploy.pruning.budget import BudgetConfig
    from fairdeploy.training.constrained import ConstrainedRecovery

    con = None
    if constrained:
        con = ConstrainedRecovery(max_group_drop=eps)
        if args.dual_lr is not None:
            con = replace(con, dual_lr=args.dual_lr)
    return replace(BudgetConfig().finetune, epochs=args.finetune_epochs, lr=args.finetune_lr, distill=args.distill,
                   balance=args.balance, select=args.select, constrained=con)


def passes(point: dict[str, Any], input_val: dict[str, Any], eps: float, f1_tol: float) -> bool:
    """The guard (pruning/budget.py `guard_point`) re-applied to a recorded point at tolerance eps."""
    drops = [input_val["group_accuracy"][g] - a for g, a in point["val"]["group_accuracy"].items()
             if g in input_val["group_accuracy"]]
    return all(d <= eps + 1e-12 for d in drops) and input_val["f1_macro"] - point["val"]["f1_macro"] <= f1_tol + 1e-12


def replay(prune_json: dict[str, Any], eps: float, f1_tol: float) -> tuple[str, int, float, list[dict[str, Any]]]:
    """The search of `prune_json` (patience 1) re-run at tolerance eps <= its own: (reached model name, its round,
    its MACs fraction, the rounds it would have run). The rounds are the same models: only the stop moves."""
    inp, base = prune_json["input"]["val"], prune_json["input"]["size"]["macs"]
    best = ("input", 0, 1.0)
    kept = []
    for r in prune_json["runs"]["candidate"]["rounds"]:
        kept.append(r)
        states = ([("pruned", r["pruned"])] if "pruned" in r else []) + [("finetuned", r["finetuned"])]
        ok = [(name, p) for name, p in states if passes(p, inp, eps, f1_tol)]
        for name, p in ok:
            frac = p["size"]["macs"] / base
            if frac < best[2] - 1e-12 or (abs(frac - best[2]) < 1e-12 and name == "finetuned"):
                best = (f"r{r['round']}-{name}", r["round"], frac)
        if not ok:
            break
    return best[0], best[1], best[2], kept


def search(dense: Path, manifest: Any, out: Path, criterion: str, constrained: bool, eps: float, seed: int,
           args) -> dict[str, Any]:
    from fairdeploy.files.json_files import read_json
    from fairdeploy.pruning.budget import BudgetConfig, compress_checkpoint

    if (out / "prune.json").is_file():  # an earlier run of the same search (the settings are in the folder name)
        return read_json(out / "prune.json")
    cfg = BudgetConfig(criterion=criterion, control="none", step=args.step, min_fraction=args.min_fraction,
                       max_group_drop=eps, max_f1_drop=args.max_f1_drop, bootstrap=1, keep_rounds=True, seed=seed,
                       finetune=recovery(args, constrained, eps))
    compress_checkpoint(dense, manifest, out, cfg, device=args.device)
    return read_json(out / "prune.json")


def finetune_only(dense: Path, manifest: Any, rounds: int, args, seed: int) -> list[Any]:
    """The dense model after 1, 2, ... `rounds` rounds of the same recovery fine-tuning, no pruning (in memory):
    one run serves every ε replayed from a search (round r's model is the same whichever ε asks for it)."""
    import torch

    from fairdeploy.device import seed_everything
    from fairdeploy.models.checkpoint import load_checkpoint
    from fairdeploy.training.finetune import finetune_model
    from fairdeploy.training.train import spec_datasets

    dev = torch.device("cpu" if args.device == "auto" else args.device)
    teacher, spec = load_checkpoint(dense, dev)
    model = copy.deepcopy(teacher)
    train_ds, val_ds = spec_datasets(manifest, spec)
    seed_everything(seed)
    ft = replace(recovery(args, False, 0.0), seed=seed)
    after: list[Any] = []
    with tempfile.TemporaryDirectory() as scratch:
        for r in range(rounds):
            model, _ = finetune_model(model, spec, train_ds, val_ds, ft, Path(scratch) / f"r{r}", dev,
                                      teacher=teacher)
            after.append(copy.deepcopy(model))
    return after


# ---- the grid -------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        return render_again(Path(args.render), Path(args.plot))
    import torch

    torch.set_num_threads(args.threads)
    from fairdeploy.data.manifest import read_manifest

    dev = common.resolve(args.device)
    info = common.machine(dev)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="fair-compression-"))
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    frontiers: list[dict[str, Any]] = []
    top_eps = max(args.eps)
    for dataset in args.dataset:
        if dataset == "utkface" and not UTKFACE.is_dir():
            print(f"skipping utkface: {UTKFACE} is absent", flush=True)
            continue
        for seed in args.seeds:
            t0 = time.perf_counter()
            manifest, dense, root = dense_checkpoint(dataset, work, seed, args)
            m = read_manifest(manifest, root)
            base = test_metrics(dense, manifest, root)
            tested: dict[Path, dict[str, Any]] = {dense: base}  # each checkpoint's test metrics, once per seed
            rows.append({"dataset": dataset, "seed": seed, "eps": None, "config": "dense", "macs_fraction": 1.0,
                         "round": 0, **base, "seconds": time.perf_counter() - t0})
            print(f"[{dataset} seed {seed}] dense: {_line(base)}", flush=True)
            tag = (f"st{args.step:g}-f{args.min_fraction:g}-ep{args.finetune_epochs}-lr{args.finetune_lr:g}-"
                   f"d{args.distill:g}-{args.balance}-{args.select}" + (f"-dl{args.dual_lr:g}" if args.dual_lr else ""))
            for config in args.configs:
                criterion, how = config.split("+")
                constrained = how == "constrained"
                once = not constrained or args.replay_constrained
                for eps in ([top_eps] if once else args.eps):
                    out = work / f"{dataset}-s{seed}-{criterion}-{how}-e{eps:g}-{tag}"
                    t1 = time.perf_counter()
                    rec = search(dense, m, out, criterion, constrained, eps, seed, args)
                    seconds = time.perf_counter() - t1
                    frontiers.append({"dataset": dataset, "seed": seed, "config": config, "eps": eps,
                                      "points": _frontier(rec)})
                    replayed = {e: replay(rec, e, args.max_f1_drop) for e in (args.eps if once else [eps])}
                    ft_models = (finetune_only(dense, m, max(max(r[1], 1) for r in replayed.values()), args, seed)
                                 if config == BLIND else [])
                    ft_tested: dict[int, dict[str, Any]] = {}  # each fine-tune-only round's test metrics, once
                    for e, (name, rnd, frac, kept) in replayed.items():
                        ckpt = dense if name == "input" else out / "rounds" / f"candidate-{name}"
                        if ckpt not in tested:  # replays at several eps may reach the same round
                            tested[ckpt] = test_metrics(ckpt, manifest, root)
                        met = tested[ckpt]
                        rows.append({"dataset": dataset, "seed": seed, "eps": e, "config": config, "reached": name,
                                     "constraint_eps": eps if constrained else None,
                                     "round": rnd, "macs_fraction": frac, "rounds_run": len(kept), **met,
                                     "seconds": seconds, "stopped_because": rec["runs"]["candidate"]["stopped_because"]})
                        print(f"[{dataset} seed {seed}] {config} eps {e:g}: reached x{frac:.3f} MACs ({name}); "
                              f"test {_line(met)} ({seconds:.0f} s)", flush=True)
                        if config == BLIND:  # the fine-tune-only control: the blind reached model's recovery
                            if max(rnd, 1) not in ft_tested:
                                ft_tested[max(rnd, 1)] = test_metrics(dense, manifest, root,
                                                                      model=ft_models[max(rnd, 1) - 1])
                            met = ft_tested[max(rnd, 1)]
                            rows.append({"dataset": dataset, "seed": seed, "eps": e, "config": "finetune-only",
                                         "round": max(rnd, 1), "macs_fraction": 1.0, **met})
                            print(f"[{dataset} seed {seed}] finetune-only ({max(rnd, 1)} rounds) eps {e:g}: "
                                  f"test {_line(met)}", flush=True)
    summary, paired, targets = _report(rows, args.eps, frontiers, args.plot)
    path = common.write_results(args.out, "fair_compression", args, info, rows, summary=summary, paired=paired,
                                targets=targets, frontiers=frontiers)
    print(f"machine: {common.describe_machine(info)}\nresults: {path}")
    return 0


def _report(rows: list[dict[str, Any]], eps_list: list[float], frontiers: list[dict[str, Any]], plot: str | Path
            ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Print the tables and target lines of `rows` and draw the frontiers (if any) to `plot`; returns the summary,
    paired and target records (main's and render_again's ending)."""
    summary, paired, targets = summarise(rows, eps_list)
    print(render(summary, paired, targets))
    if frontiers:
        plot_frontiers(frontiers, Path(plot))
        print(f"frontier plot: {plot}")  # as given (main: the --plot text)
    return summary, paired, targets


def render_again(results: Path, plot: Path) -> int:
    """The tables and target lines of an earlier run, recomputed from its rows (the current summary code)."""
    from fairdeploy.files.json_files import read_json

    data = read_json(results)
    _report(data["results"], data["args"]["eps"], data.get("frontiers") or [], plot)
    print(f"machine: {common.describe_machine(data['machine'])}; at end {data.get('load_average_at_end')}")
    return 0


def _frontier(rec: dict[str, Any]) -> list[dict[str, Any]]:
    base = rec["input"]["size"]["macs"]
    pts = [{"macs_fraction": 1.0, "worst_group_accuracy": rec["input"]["val"]["worst_group_accuracy"],
            "eodd": rec["input"]["val"]["fairness"].get("eodd"), "f1_macro": rec["input"]["val"]["f1_macro"]}]
    for r in rec["runs"]["candidate"]["rounds"]:
        v = r["finetuned"]["val"]
        pts.append({"macs_fraction": r["finetuned"]["size"]["macs"] / base, "worst_group_accuracy": v["worst_group_accuracy"],
                    "eodd": v["fairness"].get("eodd"), "f1_macro": v["f1_macro"], "round": r["round"]})
    return pts


def _line(m: dict[str, Any]) -> str:
    return (f"worst-group {m['worst_group_accuracy']:.4f}, Eodd {m['eodd']:.4f}, macro-F1 {m['f1_macro']:.4f}, "
            f"MACs {m['macs'] / 1e6:.1f} M")


def mean_ci(values: list[float]) -> dict[str, float]:
    m = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": m, "half_width": float("nan"), "n": len(values)}
    half = T975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))
    return {"mean": m, "half_width": half, "n": len(values)}


def geometric_ci(ratios: list[float]) -> dict[str, float]:
    """Geometric mean of ratios with the t-interval of the mean log ratio, taken back (a ratio's interval)."""
    logs = [math.log(r) for r in ratios]
    c = mean_ci(logs)
    half = c["half_width"]
    return {"mean": math.exp(c["mean"]), "low": math.exp(c["mean"] - half), "high": math.exp(c["mean"] + half),
            "n": c["n"]}


def summarise(rows: list[dict[str, Any]], eps_list: list[float]
              ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Per (dataset, eps, config): means with t-intervals over seeds; paired per-seed differences against the blind
    search (ratio of MAC reductions, Δ test worst-group accuracy); and the issue's target per (dataset, eps)."""
    dense = {(r["dataset"], r["seed"]): r for r in rows if r["config"] == "dense"}
    keyed: dict[tuple[str, float, str], dict[int, dict[str, Any]]] = {}
    for r in rows:
        if r["config"] != "dense":
            keyed.setdefault((r["dataset"], r["eps"], r["config"]), {})[r["seed"]] = r
    summary = []
    for (dataset, eps, config), by_seed in sorted(keyed.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        rs = list(by_seed.values())
        entry: dict[str, Any] = {"dataset": dataset, "eps": eps, "config": config, "seeds": len(rs)}
        for k in ("macs_fraction", "worst_group_accuracy", "eodd", "f1_macro"):
            entry[k] = mean_ci([float(r[k]) for r in rs])
        entry["reduction"] = mean_ci([1.0 / float(r["macs_fraction"]) for r in rs])
        entry["wga_minus_dense"] = mean_ci([r["worst_group_accuracy"] - dense[(dataset, s)]["worst_group_accuracy"]
                                            for s, r in by_seed.items()])
        summary.append(entry)
    paired, targets = [], []
    for (dataset, eps, config), by_seed in sorted(keyed.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        blind = keyed.get((dataset, eps, BLIND), {})
        seeds = sorted(set(by_seed) & set(blind))
        if config == BLIND or not seeds:
            continue
        ratio = [blind[s]["macs_fraction"] / by_seed[s]["macs_fraction"] for s in seeds]
        dwga = [by_seed[s]["worst_group_accuracy"] - blind[s]["worst_group_accuracy"] for s in seeds]
        paired.append({"dataset": dataset, "eps": eps, "config": config, "seeds": seeds, "per_seed_ratio": ratio,
                       "ratio": mean_ci(ratio), "geometric_ratio": geometric_ci(ratio), "per_seed_delta_wga": dwga,
                       "delta_wga": mean_ci(dwga)})
    for dataset, eps in sorted({(d, e) for d, e, _ in keyed}):
        cand = [p for p in paired if p["dataset"] == dataset and p["eps"] == eps and p["config"] != "finetune-only"]
        met, shown = [], []
        for p in cand:
            rs = keyed[(dataset, eps, p["config"])]
            wga_ok = all(rs[s]["worst_group_accuracy"] >= dense[(dataset, s)]["worst_group_accuracy"] - 0.01
                         for s in p["seeds"])
            g = p["geometric_ratio"]
            if p["ratio"]["mean"] >= 1.5 and wga_ok:
                met.append(f"{p['config']} (ratio {p['ratio']['mean']:.2f} ± {p['ratio']['half_width']:.2f}; "
                           f"geometric {g['mean']:.2f} [{g['low']:.2f}, {g['high']:.2f}])")
                if g["low"] >= 1.5:
                    shown.append(p["config"])
        targets.append({"dataset": dataset, "eps": eps, "met_by": met, "shown_by": shown,
                        "line": (f"{dataset} eps {eps:g}: target (>= 1.5x the blind search's MAC reduction, test "
                                 f"worst-group >= dense - 0.01 on every seed) "
                                 + (f"met on the mean by {', '.join(met)}; with the interval (its geometric lower "
                                    f"end >= 1.5) by {', '.join(shown) or 'none'}" if met
                                    else "met by no configuration"))})
    return summary, paired, targets


def render(summary: list[dict[str, Any]], paired: list[dict[str, Any]], targets: list[dict[str, Any]]) -> str:
    def ci(e: dict[str, float], d: int = 3) -> str:
        if math.isnan(e["half_width"]):
            return f"{e['mean']:.{d}f}"
        return f"{e['mean']:.{d}f} ± {e['half_width']:.{d}f}"

    def geometric(g: dict[str, float]) -> str:
        return f"{g['mean']:.2f}" if math.isnan(g["low"]) else f"{g['mean']:.2f} [{g['low']:.2f}, {g['high']:.2f}]"

    head = ["dataset", "eps", "configuration", "seeds", "MACs kept", "MAC reduction", "test worst-group",
            "Δ vs dense", "test Eodd", "test macro-F1"]
    rows = [[s["dataset"], f"{s['eps']:g}", s["config"], s["seeds"], ci(s["macs_fraction"]), ci(s["reduction"], 2),
             ci(s["worst_group_accuracy"]), ci(s["wga_minus_dense"]), ci(s["eodd"]), ci(s["f1_macro"])]
            for s in summary]
    phead = ["dataset", "eps", "configuration vs magnitude+plain", "per-seed reduction ratio", "ratio",
             "geometric ratio [95 %]", "per-seed Δ test worst-group", "Δ test worst-group"]
    prows = [[p["dataset"], f"{p['eps']:g}", p["config"], " ".join(f"{v:.2f}" for v in p["per_seed_ratio"]),
              ci(p["ratio"], 2), geometric(p["geometric_ratio"]),
              " ".join(f"{v:+.3f}" for v in p["per_seed_delta_wga"]), ci(p["delta_wga"])]
             for p in paired]
    return "\n".join([common.table(head, rows), "", common.table(phead, prows), "",
                      *(t["line"] for t in targets)])


def plot_frontiers(frontiers: list[dict[str, Any]], path: Path) -> None:
    """Validation worst-group accuracy against MACs kept, every round of every search (one panel per dataset)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    datasets = sorted({f["dataset"] for f in frontiers})
    configs = sorted({(f["config"], f["eps"]) for f in frontiers})
    fig, axes = plt.subplots(1, len(datasets), figsize=(6.5 * len(datasets), 4.2), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        for i, (config, eps) in enumerate(configs):
            for f in (f for f in frontiers if f["dataset"] == dataset and f["config"] == config and f["eps"] == eps):
                pts = f["points"]
                ax.plot([p["macs_fraction"] for p in pts], [p["worst_group_accuracy"] for p in pts], marker="o",
                        markersize=3, color=f"C{i}", alpha=0.7,
                        label=f"{config} (eps {eps:g})" if f["seed"] == min(g["seed"] for g in frontiers) else None)
        ax.set_xscale("log")
        ax.invert_xaxis()
        ax.xaxis.set_major_locator(FixedLocator([1.0, 0.5, 0.25, 0.1, 0.05]))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels(["x1", "x0.5", "x0.25", "x0.1", "x0.05"])
        ax.set_xlabel("MACs kept (fraction of the dense model, log scale)")
        ax.set_ylabel("validation worst-group accuracy")
        ax.set_title(f"{dataset}: every round of every search (one line per seed)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
