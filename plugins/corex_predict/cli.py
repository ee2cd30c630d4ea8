"""``corex export``, ``corex predict`` and ``corex evaluate`` (added through the ``corex_cli`` hook)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TTA_HELP = "test-time augmentation views averaged with the original, comma-separated: hflip, scale (or scale=0.85)"


def add_commands(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser(
        "export", help="write a run's whole model (or its encoder) as one file: .pt, .onnx or .ts",
        description="Write the model of a run (encoder and heads, and the input gate the run fitted) plus everything needed "
                    "to use it into OUT: a weights_only torch file (.pt), an ONNX graph (.onnx, run with onnxruntime) or a "
                    "TorchScript graph (.ts, run with torch.jit.load); the metadata is embedded where the format allows and "
                    "written beside as OUT with suffix .json, and MODEL_CARD.md beside it.",
    )
    export.add_argument("run_dir", type=Path, help="a corex run directory, or a .pt file written by `corex export` (to convert it)")
    export.add_argument("output", type=Path, help="the file to write: .pt, .onnx or .ts (metadata goes beside it as .json)")
    export.add_argument("--format", choices=("pt", "onnx", "torchscript"), help="default: from OUT's suffix")
    export.add_argument("--onnx-exporter", choices=("dynamo", "legacy"), default="dynamo",
                        help="torch.onnx's torch.export-based exporter (default) or the older TorchScript-based one (faster)")
    export.add_argument("--stage", help="the stage whose final model to export (default: the last stage that produced one)")
    export.add_argument("--encoder-only", action="store_true", help="only the encoder's state dict with clean keys, for transfer")
    export.set_defaults(handler=cmd_export)

    predict = commands.add_parser(
        "predict", help="predict DICOM, PNG or JPEG radiographs with a run or an exported model",
        description="Predict every file (folders are searched recursively for .dcm/.dicom/.png/.jpg/.jpeg) per image "
                    "and per study; write OUT/predictions.json and OUT/predictions.csv. Exit code 0 when every file "
                    "was predicted, 1 when some could not be read (listed on stderr and in predictions.json), 2 for usage errors.",
    )
    predict.add_argument("model", type=Path, help="a run directory or a file written by `corex export`")
    predict.add_argument("inputs", nargs="+", type=Path, metavar="FILE_OR_DIR")
    predict.add_argument("--out", type=Path, required=True, help="folder for predictions.json, predictions.csv and overlays")
    predict.add_argument("--stage", help="with a run directory: the stage whose model to use (default: the last)")
    predict.add_argument("--study-csv", type=Path, help="CSV with a file column (path/file/image) and a study column (study/study_id); "
                         "default: the DICOM StudyInstanceUID, and each picture its own study")
    predict.add_argument("--batch-size", type=int, default=16)
    predict.add_argument("--tta", help=TTA_HELP)
    predict.add_argument("--saliency", action="store_true", help="write Grad-CAM (and opacity) overlay PNGs to OUT/saliency/")
    predict.add_argument("--saliency-level", type=int, help="encoder pyramid level of the Grad-CAM: -1 deepest, -2 twice as fine "
                         "(default: the deepest whose map is at least 8 pixels a side)")
    predict.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1 ...")
    predict.add_argument("--workers", type=int, default=0, help="decoding processes (0: decode in this process)")
    predict.add_argument("--gate", choices=("warn", "strict", "off"), default="warn",
                         help="the input gate (DICOM header checks; the out-of-distribution score when the model carries one): "
                              "warn (default: flagged inputs are predicted and marked), strict (refused: exit 2), off")
    predict.add_argument("--no-progress", action="store_true")
    predict.set_defaults(handler=cmd_predict)

    evaluate = commands.add_parser(
        "evaluate", help="evaluate a finished run (or an export) again, without training",
        description="Evaluate the run's final model on a split of the run's data into a new folder "
                    "RUN/evaluations/<split>-<n>/ (results.json and the evaluators' artefacts); never overwrites the run.",
    )
    evaluate.add_argument("model", type=Path, help="a run directory or a file written by `corex export`")
    evaluate.add_argument("--split", default="test", choices=("train", "val", "test"))
    evaluate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="override the run's recipe for this evaluation, e.g. data.root=/data/siim (repeatable)")
    evaluate.add_argument("--evaluators", help="comma-separated evaluator names (default: the recipe's evaluate stage's)")
    evaluate.add_argument("--tta", help=TTA_HELP + "; metrics with TTA are added as tta/<metric>")
    evaluate.add_argument("--stage", help="the stage whose model to evaluate (default: the last that produced one)")
    evaluate.add_argument("--out", type=Path, help="a new folder for the evaluation (default: RUN/evaluations/<split>-<n>)")
    evaluate.add_argument("--batch-size", type=int)
    evaluate.add_argument("--device", help="default: the recipe's device")
    evaluate.add_argument("--json", action="store_true", help="print results.json on stdout instead of the summary table")
    evaluate.set_defaults(handler=cmd_evaluate)


def cmd_export(args: argparse.Namespace) -> int:
    from corex_predict.export import export_model

    meta = export_model(args.run_dir, args.output, stage=args.stage, encoder_only=args.encoder_only, format=args.format,
                        onnx_exporter=args.onnx_exporter)
    what = "encoder" if args.encoder_only else f"model (encoder + {', '.join(meta['heads']) or 'no'} heads)"
    kind = (meta.get("graph") or {}).get("kind", "pt") if not args.encoder_only else "pt"
    gate = " with its input gate" if meta.get("input_gate") and not args.encoder_only else ""
    from corex_predict.export import metadata_path

    print(f"wrote {args.output} ({kind}): stage '{meta['stage']}' {what}{gate}, {meta['arch']}, {meta['parameters']:,} parameters; "
          f"metadata in {metadata_path(args.output, kind)}; model card beside it")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from corex_predict.inputs import display_name
    from corex_predict.model import load_model
    from corex_predict.prediction import check_out, predict, write_predictions

    check_out(args.out)  # before any work
    model = load_model(args.model, stage=args.stage, device=args.device)
    predictions = predict(
        model, args.inputs, batch_size=args.batch_size, tta=args.tta, study_csv=args.study_csv,
        saliency=args.out / "saliency" if args.saliency else None, saliency_level=args.saliency_level,
        workers=args.workers, progress=not args.no_progress, gate=args.gate,
    )
    json_path, csv_path = write_predictions(predictions, args.out)
    _print_table(predictions)
    for warning in predictions.info.get("warnings", []):
        print(f"corex predict: note: {warning}", file=sys.stderr)
    for entry in predictions.skipped:
        print(f"corex predict: skipped {entry['file']}: {entry['reason']}", file=sys.stderr)
    for record in predictions.flagged:
        print(f"corex predict: flagged {record['file']}: {record['flags']} (predicted anyway; --gate strict refuses flagged inputs)",
              file=sys.stderr)
    for entry in predictions.refused:
        print(f"corex predict: refused {entry['file']}: {entry['flags']}", file=sys.stderr)
    images, studies = len(predictions.images), len(predictions.studies)
    gate = predictions.info.get("gate", {})
    checks = "off" if not gate.get("header_checks") else ("header checks and out-of-distribution score" if gate.get("out_of_distribution")
                                                          else "header checks only (the model carries no fitted gate)")
    print(f"predicted {images} image(s) in {studies} study(ies), flagged {len(predictions.flagged)}, refused {len(predictions.refused)}, "
          f"skipped {len(predictions.skipped)} (input gate: {checks}); wrote {display_name(json_path)} and {display_name(csv_path)}",
          file=sys.stderr)
    if predictions.refused:
        print(f"corex predict: --gate strict refused {len(predictions.refused)} input(s) (reasons above)", file=sys.stderr)
        return 2
    return 1 if predictions.skipped else 0


def _print_table(predictions, limit: int = 20) -> None:
    prob_columns = [k for k in (predictions[0] if predictions else {}) if k.startswith("prob_")]
    rows = predictions.studies[:limit] + predictions.images[: max(0, limit - len(predictions.studies))]
    for record in rows:
        name = record["study_id"] if record["level"] == "study" else record["file"]
        probs = " ".join(f"{c[5:]}={record[c]:.3f}" for c in prob_columns)
        extra = f" opacity={record['opacity_fraction']:.1%}" if "opacity_fraction" in record else ""
        flags = f"  [flagged: {record['flags']}]" if record.get("flags") else ""
        print(f"{record['level']:5s} {record.get('predicted', '-'):14s} {probs}{extra}  {name}{flags}")
    if len(predictions) > len(rows):
        print(f"... {len(predictions) - len(rows)} more records in predictions.csv")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from corex_predict.evaluation import evaluate

    names = [n.strip() for n in args.evaluators.split(",") if n.strip()] if args.evaluators else None
    results, folder = evaluate(
        args.model, split=args.split, overrides=args.overrides, evaluators=names, tta=args.tta, stage=args.stage,
        out=args.out, batch_size=args.batch_size, device=args.device,
    )
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(evaluation_table(results))
    print(f"evaluation written to {folder}", file=sys.stderr)
    return 0


def evaluation_table(results: dict) -> str:
    """Headline metrics (as their plugins declare them, corex.metrics) with their 95% intervals, and with
    TTA beside them when it was used."""
    from corex.metrics import catalog

    stage = results["stages"]["evaluate"]
    metrics, intervals = stage["metrics"], stage.get("intervals", {})
    tta = results.get("tta") or []
    lines = [f"{results['model']} (stage {results['stage']}), {results['split']} split" + (f", TTA: {', '.join(tta)}" if tta else "")]
    lines.append(f"  {'metric':18s} {'value':>7s}  {'95% interval':16s}" + (f" {'with TTA':>8s}" if tta else ""))
    shown_keys = [key for key in [*catalog().headline(), "loss"] if isinstance(metrics.get(key), (int, float))]
    for key in shown_keys:
        value = metrics[key]
        interval = intervals.get(key)
        shown = f"[{interval[0]:.3f}, {interval[1]:.3f}]" if interval and None not in interval else ""
        augmented = metrics.get(f"tta/{key}")
        lines.append(f"  {key:18s} {value:7.3f}  {shown:16s}" + (f" {augmented:8.3f}" if isinstance(augmented, (int, float)) else ""))
    # The rest (per class, per subgroup, ...) is in results.json: say how much, so a short table is not read as all.
    hidden = sorted({key.split("/", 1)[0] + ("/..." if "/" in key else "") for key in metrics
                     if key not in shown_keys and not key.startswith(("tta/", "loss/"))})
    if hidden:
        lines.append(f"  more in results.json: {', '.join(hidden)}")
    return "\n".join(lines)
