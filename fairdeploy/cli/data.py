"""`fairdeploy data ...`: build a manifest from a dataset's own tables and inspect a manifest."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from fairdeploy.cli.console import console
from fairdeploy.cli.option_blocks import Images, option_blocks
from fairdeploy.cli.options import DataOpt, OverwriteOpt, SeedOpt, configure, keyword_default, optional_option
from fairdeploy.cli.outputs import OUT_POLICIES, prepare_record, read_prepare_record
from fairdeploy.data.adapters import (
    ATTRIBUTES,
    DEFAULT_AGE_THRESHOLD,
    DEFAULT_IMAGE_EXT,
    FITZPATRICK_LABEL_COLUMNS,
    FORMATS,
    GROUPINGS,
    UNKNOWN_POLICIES,
    prepare,
)
from fairdeploy.data.inspect import inspect_manifest, support_table
from fairdeploy.data.manifest import read_manifest, write_manifest
from fairdeploy.data.splits import DEFAULT_FRACTIONS
from fairdeploy.data.synth import SynthConfig
from fairdeploy.errors import FairdeployError
from fairdeploy.files.hashing import sha256_file
from fairdeploy.files.json_files import write_json
from fairdeploy.files.outputs import claim_output

data_app = typer.Typer(
    help="Datasets: build a manifest (image,label,group,split) from a dataset's tables, inspect one.",
    no_args_is_help=True,
)

_MAX_LISTED = 20
PREPARE_SEED = keyword_default(prepare, "seed")  # the seed `data prepare` uses without --seed (read once: the function may be replaced in a test)


def _print_support(rows: Sequence[tuple[str, str, str, int]], title: str) -> None:
    """One row per class, one column per split x group."""
    columns = list(dict.fromkeys((s, g) for s, _, g, _ in rows))
    classes = list(dict.fromkeys(c for _, c, _, _ in rows))
    counts = {(s, c, g): n for s, c, g, n in rows}
    table = Table(title=title, show_footer=True)
    table.add_column("class", footer="total")
    for s, g in columns:
        total = sum(counts[(s, c, g)] for c in classes)
        table.add_column(f"{s}\n{g}", justify="right", footer=str(total))
    for c in classes:
        cells = (str(counts[(s, c, g)]) if counts[(s, c, g)] else "[red]0[/red]" for s, g in columns)
        table.add_row(c, *cells)
    console.print(table)


def _print_list(title: str, items: Sequence[str]) -> None:
    console.print(f"[bold]{title}[/bold] ({len(items)})")
    for item in items[:_MAX_LISTED]:
        console.print(f"  {item}", highlight=False, soft_wrap=True)
    if len(items) > _MAX_LISTED:
        console.print(f"  ... and {len(items) - _MAX_LISTED} more")


def _print_prepare_report(report: dict[str, Any]) -> None:
    console.print(
        f"[bold]{report['format']}[/bold] {report['source']}: read {report['rows_read']} rows, "
        f"kept {report['rows_kept']}, dropped {sum(report['dropped'].values())}",
        highlight=False,
        soft_wrap=True,
    )
    for reason, n in report["dropped"].items():
        console.print(f"  dropped {n}: {reason}", highlight=False, soft_wrap=True)
    for reason, n in report["recoded"].items():
        console.print(f"  recoded {n}: {reason}", highlight=False, soft_wrap=True)
    if report.get("metadata_without_ground_truth"):
        console.print(f"  not in the ground truth: {report['metadata_without_ground_truth']} of "
                      f"{report['metadata_rows']} metadata rows (left out)", highlight=False, soft_wrap=True)
    line = f"groups by {report['group_by']}; labels from {report['label_column']}"
    console.print(line, highlight=False, soft_wrap=True)
    console.print(f"splits {report['splits']}", highlight=False, soft_wrap=True)


FormatOpt = Annotated[str, typer.Option("--format", "-f", help=f"Dataset format: {', '.join(FORMATS)}.")]
MetadataOpt = Annotated[Path, typer.Option("--metadata", help="The dataset's metadata CSV (csv: the table).")]
ManifestOutOpt = Annotated[Path, typer.Option("--out", "-o", help="Manifest CSV to write.")]
GroundTruthOpt = Annotated[
    Path | None, typer.Option("--ground-truth", help="isic2019: the one-hot ground truth CSV.")
]
AttributeOpt = Annotated[
    str | None,
    typer.Option("--attribute", help=f"isic2019/ham10000 groups: {', '.join(ATTRIBUTES)} (default sex)."),
]
AgeThresholdOpt = Annotated[
    float | None, typer.Option("--age-threshold", help=f"With --attribute age: <T and >=T (default: {DEFAULT_AGE_THRESHOLD:g}).")
]
LabelColumnOpt = Annotated[
    str | None,
    typer.Option(
        "--label-column",
        help=f"fitzpatrick17k: {', '.join(FITZPATRICK_LABEL_COLUMNS)} (default label); csv: any column.",
    ),
]
GroupingOpt = Annotated[
    str | None,
    typer.Option("--grouping", help=f"fitzpatrick17k: {', '.join(GROUPINGS)} (default binary: 1-3 / 4-6)."),
]
UnknownOpt = Annotated[
    str | None,
    typer.Option("--unknown", help=f"fitzpatrick17k type -1: {', '.join(UNKNOWN_POLICIES)} (default drop)."),
]
ImageColumnOpt = Annotated[str | None, typer.Option("--image-column", help="csv: the image path column.")]
GroupColumnOpt = Annotated[str | None, typer.Option("--group-column", help="csv: the sensitive group.")]
SplitColumnOpt = Annotated[str | None, typer.Option("--split-column", help="csv: keep this split column.")]
IdColumnOpt = Annotated[str | None, typer.Option("--id-column", help="csv: an id kept in one split.")]
ImageExtOpt = Annotated[str | None, typer.Option("--image-ext", help=f"Added to image ids (default: {DEFAULT_IMAGE_EXT}).")]
ImagePrefixOpt = Annotated[
    str, typer.Option("--image-prefix", help="Folder prepended to every image path, e.g. images.")
]
TrainOpt = Annotated[float, typer.Option("--train", help="Train fraction.")]
ValOpt = Annotated[float, typer.Option("--val", help="Validation fraction.")]
TestOpt = Annotated[float, typer.Option("--test", help="Test fraction.")]
CheckImagesOpt = Annotated[
    bool,
    typer.Option("--check-images/--no-check-images", help="Open and decode every image (existence: always)."),
]
ReportOutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="Write the report as JSON here.")]


@data_app.command("prepare")
def prepare_cmd(
    fmt: FormatOpt,
    metadata: MetadataOpt,
    out: ManifestOutOpt,
    ground_truth: GroundTruthOpt = None,
    attribute: AttributeOpt = None,
    age_threshold: AgeThresholdOpt = None,
    label_column: LabelColumnOpt = None,
    grouping: GroupingOpt = None,
    unknown: UnknownOpt = None,
    image_column: ImageColumnOpt = None,
    group_column: GroupColumnOpt = None,
    split_column: SplitColumnOpt = None,
    id_column: IdColumnOpt = None,
    image_ext: ImageExtOpt = None,
    image_prefix: ImagePrefixOpt = "",
    train: TrainOpt = DEFAULT_FRACTIONS[0],  # the split fractions' defaults: fairdeploy.data.splits
    val: ValOpt = DEFAULT_FRACTIONS[1],
    test: TestOpt = DEFAULT_FRACTIONS[2],
    seed: optional_option(SeedOpt, str(PREPARE_SEED)) = None,  # type: ignore[valid-type]
    overwrite: OverwriteOpt = False,
) -> None:
    """Build a manifest from Fitzpatrick 17k, ISIC 2019, HAM10000 or a CSV, with seeded stratified splits.
    Beside it, OUT.prepare.json records how (the proof that a later `data prepare --out OUT` may replace it)."""
    record = prepare_record(out)
    with claim_output(out, OUT_POLICIES["data prepare"], overwrite=overwrite,
                      inputs={"--metadata": metadata, "--ground-truth": ground_truth}):
        check_record_path(record, overwrite)
        seed = PREPARE_SEED if seed is None else seed
        result = prepare(
            fmt,
            metadata,
            ground_truth=ground_truth,
            attribute=attribute,
            age_threshold=age_threshold,
            label_column=label_column,
            grouping=grouping,
            unknown=unknown,
            image_column=image_column,
            group_column=group_column,
            split_column=split_column,
            id_column=id_column,
            image_ext=image_ext,
            image_prefix=image_prefix,
            fractions=(train, val, test),
            seed=seed,
        )
        write_manifest(result.records, out)
        write_json(record, {"command": "data prepare", "manifest": out.name, "manifest_sha256": sha256_file(out),
                            "metadata": str(metadata), "ground_truth": None if ground_truth is None else str(ground_truth),
                            "fractions": [train, val, test], "report": result.report,
                            "seed": seed})
    _print_prepare_report(result.report)
    _print_support(support_table(result.records), title=f"support: {out.name}")
    console.print(f"wrote {out}", highlight=False, soft_wrap=True)


def check_record_path(record: Path, overwrite: bool) -> None:
    """The record's name may hold only an earlier record of `data prepare` (or anything, with --overwrite; never
    a device or FIFO)."""
    from fairdeploy.files.entries import special_file

    what = special_file(record)
    if what is not None:
        raise FairdeployError(f"{record} (the manifest's record) is {what}: choose another --out")
    if record.is_dir() or (not overwrite and (record.exists() or record.is_symlink())
                           and read_prepare_record(record) is None):
        raise FairdeployError(f"{record} (where data prepare records the manifest) exists and is not such a record: "
                              "move it, choose another --out" + ("" if record.is_dir() else ", or pass --overwrite"))


@data_app.command("inspect")
@option_blocks
def inspect_cmd(
    data: DataOpt,
    images: Images = Images(),
    check_images: CheckImagesOpt = True,
    out: ReportOutOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Support per split x class x group, duplicate and leaking images, missing and unreadable images; exit 2
    when any image is bad."""
    if out is None:
        _inspect(data, images, check_images, None)
        return
    with claim_output(out, OUT_POLICIES["data inspect"], overwrite=overwrite,
                      inputs={"--data": data, "--images-root": images.images_root}):
        _inspect(data, images, check_images, out)


def _inspect(data: Path, images: Images, check_images: bool, out: Path | None) -> None:
    import warnings

    from fairdeploy.data.manifest import ManifestWarning

    with warnings.catch_warnings():  # the report below lists every duplicate, not just one example
        warnings.simplefilter("ignore", ManifestWarning)
        manifest = images.read(data)
    report = inspect_manifest(manifest, check_images=check_images)
    _print_support(report.support, title=f"support: {data.name}")
    for split, groups in report.groups_per_split:
        console.print(f"{split}: groups {', '.join(groups)}", highlight=False, soft_wrap=True)
    _print_list("classes absent from a group in a split", [f"{s} / {c} / {g}" for s, c, g in report.absent])
    dups = report.duplicates
    for title, items in (("duplicate rows", dups.rows), ("images in more than one split (leakage)", dups.cross_split),
                         ("images with more than one label", dups.labels),
                         ("images with more than one group", dups.groups)):
        if items:
            _print_list(f"[yellow]{title}[/yellow]", [f"{escape(i)}: {escape(d)}" for i, d in items])
    _print_list("missing images", list(report.missing))
    if report.images_checked:
        _print_list("unreadable images", [f"{p}: {e}" for p, e in report.unreadable])
    if out is not None:
        write_json(out, report.to_dict())
        console.print(f"wrote {out}", highlight=False, soft_wrap=True)
    if not report.ok:
        raise FairdeployError(
            f"{data}: {len(report.missing)} missing and {len(report.unreadable)} unreadable image(s) "
            f"of {report.n_records} under {report.root}"
        )


_SYNTH = SynthConfig()  # the defaults `data synth --help` shows
# `data synth`: each option sets the SynthConfig field of its name (fairdeploy.cli.options.configure).
SYNTH_FIELDS: dict[str, str | tuple[str, ...]] = {name: name for name in (
    "n_images", "image_size", "dark_fraction", "bias", "dark_bias", "dark_contrast", "image_format", "seed")}
SYNTH_FLAGS = {"image_format": "--format"}  # the option whose flag is not --NAME


@data_app.command("synth")
def synth_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (images/ + manifest.csv).")],
    n_images: Annotated[int | None, typer.Option("--n-images", help=f"Number of images (default: {_SYNTH.n_images}).")] = None,
    image_size: Annotated[int | None, typer.Option("--image-size", help=f"Image side in pixels (default: {_SYNTH.image_size}).")] = None,
    dark_fraction: Annotated[float | None, typer.Option(help=f"Share of the 'dark' (unprivileged) group (default: {_SYNTH.dark_fraction}).")] = None,
    bias: Annotated[float | None, typer.Option(help=f"P(marker colour agrees with the class) in the 'light' group (default: {_SYNTH.bias}).")] = None,
    dark_bias: Annotated[
        float | None, typer.Option(help="Same for the 'dark' group (default: chance, the shortcut misleads).")
    ] = None,
    dark_contrast: Annotated[float | None, typer.Option(help=f"Lesion darkening factor on dark skin (1 = invisible; default: {_SYNTH.dark_contrast}).")] = None,
    image_format: Annotated[str | None, typer.Option("--format", help=f"png or jpg (default: {_SYNTH.image_format}).")] = None,
    seed: optional_option(SeedOpt, str(_SYNTH.seed)) = None,  # type: ignore[valid-type]
    overwrite: OverwriteOpt = False,
) -> None:
    """Generate a synthetic dataset whose shortcut cue helps one group and hurts the other."""
    from fairdeploy.data.synth import generate_synthetic

    options = {"n_images": n_images, "image_size": image_size, "dark_fraction": dark_fraction, "bias": bias,
               "dark_bias": dark_bias, "dark_contrast": dark_contrast, "image_format": image_format, "seed": seed}
    cfg = configure(SynthConfig, SYNTH_FIELDS, options, flags=SYNTH_FLAGS)  # option mistakes first
    with claim_output(out, OUT_POLICIES["data synth"], overwrite=overwrite):
        manifest_path = generate_synthetic(out, cfg)
    manifest = read_manifest(manifest_path)
    _print_support(support_table(manifest.records), title=f"{manifest_path}")
    console.print(f"manifest: {manifest_path}")
