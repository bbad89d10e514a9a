"""Options shared by several commands (declared once) and the console used for output."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import json
import re
import sys
import time
import typing
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from fairdeploy.data.manifest import Manifest, read_manifest
from fairdeploy.files.outputs import OutputPolicy

T = TypeVar("T")

# Wide tables stay readable when the output is a file or a CI log (rich defaults to 80 columns there).
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def print_error(message: str) -> None:
    from rich.markup import escape

    err_console.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)


# ---- how much the command says (global --quiet / --verbose) and what an interrupt leaves ----

@dataclasses.dataclass
class OutputLevel:
    """Set once per command by the global options: quiet = errors and the final result line only; verbose =
    debug lines and full tracebacks (also FAIRDEPLOY_DEBUG=1)."""

    quiet: bool = False
    verbose: bool = False


output = OutputLevel()
quiet_capture: Any = None  # the buffer fairdeploy.cli.main gives the console under --quiet (last line shown)
threads_option: int | None = None  # the global --threads, when given (it wins over a pipeline's `threads`)


def debug(message: str) -> None:
    """A detail shown with --verbose only (stderr, so that stdout stays the command's log)."""
    if output.verbose:
        err_console.print(f"debug: {message}", highlight=False, soft_wrap=True, markup=False)


def show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: Any = None, line: str | None = None) -> None:
    """warnings.showwarning for the CLI: one line `warning: ...` on stderr (none with --quiet; with --verbose
    the warning's class and where it was raised)."""
    if output.quiet:
        return
    where = f" [{category.__name__} at {filename}:{lineno}]" if output.verbose else ""
    text = " ".join(str(message).split())
    err_console.print(f"warning: {text}{where}", highlight=False, soft_wrap=True, markup=False)


# What Ctrl-C leaves behind: the running command registers a function that describes what was kept (and sets
# `resume_option` when a flag continues it); fairdeploy.cli.main prints it with the command to run again.
@dataclasses.dataclass
class InterruptNote:
    kept: Callable[[], str] | None = None
    resume_option: str | None = None
    terminated: bool = False  # the interrupt was SIGTERM (fairdeploy.cli.main: exit 143), not Ctrl-C


interrupt_note = InterruptNote()


def on_interrupt(kept: Callable[[], str], resume_option: str | None = None) -> None:
    interrupt_note.kept, interrupt_note.resume_option = kept, resume_option


ModelOpt = Annotated[Path, typer.Option("--model", "-m", help="Checkpoint directory (model.safetensors + model.json).")]
DataOpt = Annotated[Path, typer.Option("--data", "-d", help="Manifest CSV (image,label,group,split,...).")]
ImagesRootOpt = Annotated[
    Path | None, typer.Option("--images-root", help="Folder the manifest's image paths are relative to (default: the manifest's folder).")
]
AllowOutsideRootOpt = Annotated[
    bool,
    typer.Option("--allow-outside-root", help="Read manifest image paths that leave the images root ('../', absolute "
                                              "paths, symlinks pointing outside); refused by default."),
]
SplitOpt = Annotated[str, typer.Option("--split", help="Manifest split: train, val or test.")]


def check_split(split: str) -> str:
    """--split checked before any data or model is loaded."""
    from fairdeploy.data.manifest import SPLITS
    from fairdeploy.errors import FairdeployError

    if split not in SPLITS:
        raise FairdeployError(f"unknown --split {split!r}; choose one of {', '.join(SPLITS)}")
    return split

DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed.")]
OutDirOpt = Annotated[Path, typer.Option("--out", "-o", help="Output directory.")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Batch size.")]
WorkersOpt = Annotated[int, typer.Option("--workers", min=0, help="DataLoader worker processes.")]
OverwriteOpt = Annotated[
    bool,
    typer.Option("--overwrite", help="Write --out even when it exists and is not an earlier output of this command "
                                     "(a folder is replaced; by default such an --out is refused)."),
]


# ---- option blocks: options several commands take together, declared once ----
# A command takes a block as one parameter (`job: Job = Job()`) and is decorated with `option_blocks`: Typer
# sees the block's fields as options (a block inside a block too), the command gets the block built from them.

@dataclasses.dataclass(frozen=True)
class Images:
    """Where a manifest's images are read from."""

    images_root: ImagesRootOpt = None
    allow_outside_root: AllowOutsideRootOpt = False

    def read(self, data: Path) -> Manifest:
        return read_manifest(data, self.images_root, allow_outside_root=self.allow_outside_root)


def unset(option: Any, default: str) -> Any:
    """A shared `option` (Annotated[T, typer.Option]) for a command whose configuration dataclass holds the default:
    T | None (None: not given, the field keeps its default), the help ending "(default: DEFAULT)"."""
    kind, info = typing.get_args(option)
    info = copy.copy(info)
    info.help = f"{(info.help or '').rstrip('.')} (default: {default})."
    return Annotated[kind | None, info]


# ---- literal defaults in --help, read from a command's configuration dataclass (the value stays on the field) ----

def default_of(config: Any, path: str) -> Any:
    """The value at the dotted field `path` of `config`: a dataclass (read from its defaults) or an instance."""
    value: Any = config() if isinstance(config, type) else config
    for part in path.split("."):
        value = getattr(value, part)
    return value


def shown_default(value: Any) -> str:
    """A default as --help shows it: true / false, none, a list as a,b, else the value itself."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "none"
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return str(value)


def config_option(config: Any) -> Callable[..., Any]:
    """The option factory of a command whose defaults are the fields of `config` (a dataclass or an instance):
    `opt(help, path=None, *names, **kw)` is a typer.Option whose help ends "(default: VALUE)", VALUE read from
    `config` at the dotted field `path` (no path: the help as written). The option itself defaults to None (not
    given: the field keeps its default), so the value is written once, on the field."""
    def opt(help_text: str, path: str | None = None, *names: str, **kw: Any) -> Any:
        if path is not None:
            help_text = f"{help_text.rstrip('.')} (default: {shown_default(default_of(config, path))})."
        return typer.Option(*names, help=help_text, **kw)

    return opt


@dataclasses.dataclass(frozen=True)
class Job:
    """The options of a command that computes on a manifest's images and writes --out (--workers and --seed left
    unset keep the command's configuration's defaults: FitConfig's, PruneConfig's, ...)."""

    device: DeviceOpt = "auto"
    workers: unset(WorkersOpt, "the command's configuration's") = None  # type: ignore[valid-type]
    seed: unset(SeedOpt, "the command's configuration's") = None  # type: ignore[valid-type]
    images: Images = Images()
    overwrite: OverwriteOpt = False


# ---- a configuration dataclass from a command's options (fairdeploy.schema): each default is the field's ----

def configure(cls: type[T], fields: Mapping[str, str | tuple[str, ...]], options: Mapping[str, Any], *,
              base: T | None = None, flags: Mapping[str, str] | None = None) -> T:
    """`base` (default `cls()`) with the command's options over it, checked by its `validate()`.

    `fields` maps each option (its parameter name) to the dotted field path(s) it sets; `options` holds the values
    (None: not given, the field keeps its default, so no default is written in the CLI). A wrong value is reported
    with its flag (--NAME, or `flags[NAME]`): the type check names it (fairdeploy.schema), and a failed
    `validate()` is prefixed with the flag(s) whose value it is about, found by leaving each given option out."""
    from fairdeploy.errors import FairdeployError
    from fairdeploy.schema import build, flag_layer

    names = {name: (flags or {}).get(name) or "--" + name.replace("_", "-") for name in fields}

    def built(leave_out: str | None = None) -> T:
        # an option not given (None) sets nothing: a sub-table is not switched on by options that are all unset
        given = {path: (names[name], options.get(name) if name != leave_out else None)
                 for name, paths in fields.items() for path in ((paths,) if isinstance(paths, str) else paths)}
        return build(cls, [flag_layer(given)], base)[0]

    def problem(cfg: T) -> str | None:
        try:
            cfg.validate()  # type: ignore[attr-defined]
        except FairdeployError as exc:
            return str(exc)
        return None

    cfg = built()
    message = problem(cfg)
    if message is None:
        return cfg
    culprits = list(dict.fromkeys(names[name] for name in fields if options.get(name) is not None
                                  and problem(built(leave_out=name)) != message))
    if not culprits or any(re.search(rf"{re.escape(flag)}(?![\w-])", message) for flag in culprits):
        raise FairdeployError(message)  # no option to blame, or the message names it already
    raise FairdeployError(f"{', '.join(culprits)}: {message}")


def _is_block(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def _block_parameters(block: type) -> list[inspect.Parameter]:
    hints = typing.get_type_hints(block, include_extras=True)
    out: list[inspect.Parameter] = []
    for f in dataclasses.fields(block):
        if _is_block(hints[f.name]):
            out += _block_parameters(hints[f.name])
        else:
            out.append(inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=f.default,
                                         annotation=hints[f.name]))
    return out


def _build_block(block: type, values: dict[str, Any]) -> Any:
    """The block from the options' values (taken out of `values`)."""
    hints = typing.get_type_hints(block, include_extras=True)
    return block(**{f.name: _build_block(hints[f.name], values) if _is_block(hints[f.name]) else values.pop(f.name)
                    for f in dataclasses.fields(block)})


def option_blocks(command: Callable[..., Any]) -> Callable[..., Any]:
    """Expand the command's block parameters (see Images, Job) into their options, in the signature Typer reads."""
    signature = inspect.signature(command, eval_str=True)
    blocks = {name: p.annotation for name, p in signature.parameters.items() if _is_block(p.annotation)}
    params: list[inspect.Parameter] = []
    for name, p in signature.parameters.items():
        params += _block_parameters(p.annotation) if name in blocks else [p]

    @functools.wraps(command)
    def run(**values: Any) -> Any:
        built = {name: _build_block(block, values) for name, block in blocks.items()}  # takes their options out
        return command(**values, **built)

    run.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    run.__annotations__ = {p.name: p.annotation for p in params}
    return run


# ---- what each command writes at --out, and the proof that an existing --out is its own (fairdeploy.files.outputs) ----

def _json_has(path: Path, keys: tuple[str, ...]) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and all(k in data for k in keys)


PREPARE_RECORD_SUFFIX = ".prepare.json"  # `data prepare --out M.csv` records what it wrote in M.csv.prepare.json


def prepare_record(manifest: Path) -> Path:
    """The record `data prepare` writes beside its manifest (the proof that the manifest is its own)."""
    return manifest.with_name(manifest.name + PREPARE_RECORD_SUFFIX)


def read_prepare_record(record: Path) -> dict[str, Any] | None:
    """The record's content when it is one `data prepare` wrote (a regular file: never opened otherwise)."""
    if not record.is_file():
        return None
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(data, dict) and data.get("command") == "data prepare" and "manifest_sha256" in data
    return data if ok else None


def _prepared_here(path: Path) -> bool:
    """A manifest `data prepare` wrote and nobody changed since: its record names the command and holds the
    manifest's SHA-256 (a CSV with the manifest header is not proof: `data synth` and people write them too)."""
    from fairdeploy.files.hashing import sha256_if_file

    record = read_prepare_record(prepare_record(path))
    return record is not None and record["manifest_sha256"] == sha256_if_file(path)


def _last_stage(run: Path) -> Any:
    """The stage that produced a training folder's best checkpoint (model.json history), or None."""
    try:
        history = json.loads((run / "best" / "model.json").read_text()).get("history") or []
    except (OSError, ValueError, AttributeError):
        return None
    return history[-1].get("stage") if history and isinstance(history[-1], dict) else None


def _is_pipeline_run(run: Path) -> bool:
    return (run / "stages.json").is_file() or any((d / "stage.json").is_file() for d in run.iterdir() if d.is_dir())


def _report_owns(out: Path) -> bool:
    from fairdeploy.report.render import report_owns

    return report_owns(out)


OUT_POLICIES: dict[str, OutputPolicy] = {
    "data synth": OutputPolicy("data synth", record="synth.json", names=("images", "manifest.csv", "synth.json")),
    "data prepare": OutputPolicy("data prepare", kind="file", owned=_prepared_here, what="a manifest",
                                 proof=f"MANIFEST{PREPARE_RECORD_SUFFIX} record holding its SHA-256"),
    "data inspect": OutputPolicy("data inspect", kind="file", what="an inspection report",
                                 owned=lambda p: _json_has(p, ("source", "records", "support", "images_checked"))),
    "train": OutputPolicy("train", resume_option="--resume", proof="trainer.json of a train run",
                          owned=lambda p: (p / "trainer.json").is_file() and _last_stage(p) != "finetune"),
    "evaluate": OutputPolicy("evaluate", kind="file", what="a metrics JSON",
                             owned=lambda p: _json_has(p, ("overall", "groups", "fairness", "class_names"))),
    "prune": OutputPolicy("prune", record="prune.json", names=("model.safetensors", "model.json", "prune.json",
                                                                    "control", "rounds")),
    "finetune": OutputPolicy("finetune", names=("best", "last", "trainer.json"),
                             proof="trainer.json of a finetune run",
                             owned=lambda p: (p / "trainer.json").is_file() and _last_stage(p) == "finetune"),
    "export": OutputPolicy("export", record="export.json"),
    "validate": OutputPolicy("validate", record="validation.json"),
    "report": OutputPolicy("report", owned=_report_owns, proof="report.html of an earlier report"),
    "pipeline": OutputPolicy("pipeline", owned=_is_pipeline_run, proof="stages.json or a stage's stage.json"),
    "rank": OutputPolicy("rank", kind="file", what="a ranking JSON",
                         owned=lambda p: _json_has(p, ("order", "recommendation", "models"))),
}


@contextlib.contextmanager
def claim_on_main(out: Path, policy: OutputPolicy, **kw: Any) -> Iterator[Path]:
    """`claim_output` on the process that writes: the only one, or rank 0 of a torchrun job (the other ranks
    write nothing and claim nothing)."""
    from fairdeploy.distributed import world
    from fairdeploy.files.outputs import claim_output

    if world().is_main:
        with claim_output(out, policy, **kw) as claimed:
            yield claimed
    else:
        yield out


@contextlib.contextmanager
def rank_job(command: str, out: Path, job: Job, inputs: dict[str, Any],
             resume: bool | None = None) -> Iterator[tuple[Any, Any, bool]]:
    """One training/pruning command's run: the process group under torchrun (nothing otherwise), `out` claimed
    under `command`'s output policy (`inputs`, the command's input paths by flag, and --images-root may not be
    `out`) and the progress shown on the process that writes (rank 0). Yields this process's device, the
    progress callback and whether this process reports."""
    from fairdeploy.distributed import distributed_run, world

    claim = {"overwrite": job.overwrite, "resume": resume,
             "inputs": {**inputs, "--images-root": job.images.images_root}}
    with distributed_run(job.device) as rank_device, claim_on_main(out, OUT_POLICIES[command], **claim), \
            progress_on_main() as progress:
        yield rank_device, progress, world().is_main


def checkpoint_job(command: str, run: Callable[..., Any], model: Path, data: Path, out: Path, cfg: Any,
                   job: Job) -> Any:
    """The body of prune and finetune: `cfg` (built and checked by `configure`, before the manifest is read), then
    `run(model, manifest, out, cfg, device, progress)` as a `rank_job`. Returns its result on the process that
    reports, None on the others (under torchrun)."""
    manifest = job.images.read(data)
    with rank_job(command, out, job, {"--model": model, "--data": data}) as (device, progress, reports):
        result = run(model, manifest, out, cfg, device, progress)
    return result if reports else None


def progress_on_main() -> contextlib.AbstractContextManager[Any]:
    """The progress display on the process that reports (rank 0 under torchrun); silence on the others."""
    from fairdeploy.distributed import world
    from fairdeploy.progress import no_progress

    return RichProgress() if world().is_main else contextlib.nullcontext(no_progress)


class RichProgress:
    """Render the library's progress callbacks: rich progress bars on a terminal (one bar per task name, with
    the time elapsed and left), else the plain lines of fairdeploy.progress.ProgressLog on stdout (a line per
    finished task and at least one every `interval_s` seconds while the command runs, a timer thread giving it
    when no callback does)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, interval_s: float | None = None) -> None:
        import threading

        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        from fairdeploy.progress import LINE_INTERVAL_S, ProgressLog

        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TimeRemainingColumn(), console=err_console, transient=True,
        )
        self._tasks: dict[str, int] = {}
        # `cmd > log`: plain lines on stdout (the log), none on stderr (kept for errors)
        self._plain = not console.is_terminal
        self._log = ProgressLog(clock, LINE_INTERVAL_S if interval_s is None else interval_s)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None

    def __enter__(self) -> RichProgress:
        if self._plain:
            import threading

            self._timer = threading.Thread(target=self._heartbeats, name="fairdeploy-progress", daemon=True)
            self._timer.start()
            return self
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._timer is not None:
            self._stop.set()
            self._timer.join()
            self._timer = None
        if not self._plain:
            self._progress.__exit__(*exc)  # type: ignore[arg-type]

    def _print(self, line: str | None) -> None:
        if line is not None:
            console.print(line, highlight=False, soft_wrap=True, markup=False)

    def _heartbeats(self) -> None:
        while True:
            with self._lock:
                wait = self._log.next_due()
            if self._stop.wait(wait):
                return
            with self._lock:
                self._print(self._log.heartbeat())

    def __call__(self, task: str, completed: int, total: int) -> None:
        if self._plain:
            with self._lock:
                self._print(self._log.update(task, completed, total))
            return
        if task not in self._tasks:
            self._tasks[task] = self._progress.add_task(task, total=total)
        self._progress.update(self._tasks[task], completed=completed, total=total)
