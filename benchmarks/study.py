"""Run the study's six arms on the phantom and print the table of test macro-F1 (run by hand).

    python benchmarks/study.py --fractions 0.1 1.0 --seeds 0 1 2 --out runs/study

For each seed, each pre-training objective runs once (on every training image, no labels); its
encoder is then fine-tuned at every label fraction, so the fractions share one pre-training. The
from-scratch arms train at every fraction. Everything lands in OUT (one run directory per arm,
fraction and seed) and the table in OUT/study.md and OUT/study.json.

Fine-tuning on a fraction f of the labels runs epochs / f epochs, so every fraction gets the same
number of optimisation steps (and the best epoch is still chosen on validation): a 10% arm then
measures label scarcity, not under-training.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import yaml

import corex

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "phantom"
ARMS = ["classification_scratch", "multitask_scratch", "moco_classification", "moco_multitask",
        "inpaint_classification", "inpaint_multitask"]


def arm_recipe(arm: str, seed: int, fraction: float, pretrained: Path | None, sets: list[str]) -> dict:
    recipe = yaml.safe_load((RECIPES / f"{arm}.yaml").read_text())
    recipe["seed"] = seed
    recipe["data"]["label_fraction"] = fraction
    finetune = recipe["stages"]["finetune"]
    finetune["epochs"] = math.ceil(finetune["epochs"] / fraction)  # equal optimisation steps
    if pretrained is not None:  # reuse the objective's pre-training of this seed
        recipe["stages"].pop("pretrain")
        finetune["encoder_from"] = str(pretrained)
        sets = [s for s in sets if not s.startswith("stages.pretrain.")]  # that stage is gone
    return corex.load_recipe(recipe, sets)


def run_once(recipe, out: Path) -> dict:
    if (out / "results.json").exists() and all(s in json.loads((out / "results.json").read_text())["stages"] for s in recipe.stages):
        return json.loads((out / "results.json").read_text())  # already measured
    return corex.run(recipe, out=out, resume=(out / "recipe.yaml").exists(), progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 1.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, default=Path("runs/study"))
    parser.add_argument("--arms", nargs="+", default=ARMS, choices=ARMS)
    parser.add_argument("--reuse-pretraining", type=Path, metavar="DIR",
                        help="take each objective's pre-trained encoder from an earlier study's OUT instead of pre-training")
    parser.add_argument("--set", dest="sets", action="append", default=[],
                        help="extra overrides for every run, e.g. stages.finetune.freeze=true for linear probes")
    args = parser.parse_args()

    rows = []
    for seed in args.seeds:
        pretrained: dict[str, tuple[Path, float]] = {}
        for arm in args.arms:
            objective = arm.split("_")[0] if not arm.endswith("scratch") else None
            if objective and objective not in pretrained and args.reuse_pretraining:
                earlier = next(args.reuse_pretraining.glob(f"{objective}_*-s{seed}/checkpoints/pretrain/model.pt"))
                earlier_results = json.loads((earlier.parents[2] / "results.json").read_text())
                pretrained[objective] = (earlier, earlier_results["stages"]["pretrain"]["time_s"])
            for fraction in sorted(args.fractions, reverse=True):
                out = args.out / f"{arm}-f{fraction:g}-s{seed}"
                reuse = pretrained.get(objective) if objective else None
                recipe = arm_recipe(arm, seed, fraction, reuse[0] if reuse else None, args.sets)
                started = time.perf_counter()
                results = run_once(recipe, out)
                stages = results["stages"]
                if objective and objective not in pretrained:
                    pretrained[objective] = (out / "checkpoints" / "pretrain" / "model.pt", stages["pretrain"]["time_s"])
                rows.append({
                    "arm": arm, "fraction": fraction, "seed": seed,
                    "macro_f1": stages["test"]["metrics"]["macro_f1"],
                    "macro_f1_ci": stages["test"].get("intervals", {}).get("macro_f1"),
                    "auroc": stages["test"]["metrics"]["auroc"],
                    "dice": stages["test"]["metrics"].get("dice"),
                    "pretrain_s": pretrained[objective][1] if objective else 0.0,
                    "finetune_s": stages["finetune"]["time_s"],
                    "wall_s": time.perf_counter() - started,
                })
                print(json.dumps(rows[-1]), flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "study.json").write_text(json.dumps(rows, indent=2))
    table = ["| arm | label fraction | test macro-F1 (mean ± sd over seeds) | per seed [95% CI] | AUROC | Dice | pre-training s | fine-tuning s |",
             "|---|---|---|---|---|---|---|---|"]
    for arm in args.arms:
        for fraction in args.fractions:
            group = [r for r in rows if r["arm"] == arm and r["fraction"] == fraction]
            f1 = [r["macro_f1"] for r in group]
            spread = f" ± {statistics.stdev(f1):.3f}" if len(f1) > 1 else ""
            per_seed = ", ".join(f"{r['macro_f1']:.3f} [{r['macro_f1_ci'][0]:.2f}, {r['macro_f1_ci'][1]:.2f}]" if r["macro_f1_ci"] else f"{r['macro_f1']:.3f}" for r in group)
            dice = statistics.mean(r["dice"] for r in group) if group[0]["dice"] is not None else None
            table.append(
                f"| {arm} | {fraction:g} | {statistics.mean(f1):.3f}{spread} | {per_seed} | {statistics.mean(r['auroc'] for r in group):.3f} | "
                f"{'' if dice is None else f'{dice:.3f}'} | {statistics.mean(r['pretrain_s'] for r in group):.0f} | {statistics.mean(r['finetune_s'] for r in group):.0f} |"
            )
    (args.out / "study.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
