"""The pass manager: install the passes into Inductor (cache-safe), run them, keep the report.

``TpfusePass`` is a ``CustomGraphPass``: Inductor calls it on every post-grad
graph and folds its ``uuid()`` into the FX graph cache key.  The uuid covers
the source of every tpfuse module the passes import (transitively), the op's schema, the
configuration and the registered patterns, so the cache stays on and a cached
graph is never served for other settings (docs/passes.md, "Caching").

``TpfusePreGradPass`` is its companion in Inductor's ``pre_grad_custom_pass``: the training
loss's rewrite before AOTAutograd (``pre_grad_losses.py``; docs/passes.md, "Training").
``enable()`` / ``disable()`` / ``backend()`` install and remove the two together.
"""

from __future__ import annotations

import ast
import contextlib
import contextvars
import functools
import hashlib
import importlib.util
import itertools
import logging
import pathlib
import threading
import time
from dataclasses import replace
from typing import Any, Iterator

import torch
from torch.fx import Graph

from .. import config as settings
from ..config import PassConfig, pass_config
from . import cache_records
from . import patterns as pattern_registry
from ..compile_ops import inductor_lowering
from .dynamo_compat import allow_funcol_gather_tracing
from .barrier_elision import apply_barrier_decisions, attach_to_matches, decide_barriers
from .hidden_gather import find_hidden_gathers, rewrite_hidden_gathers
from .gather_elimination import ELIMINATIONS, find_gather_eliminations, mark_eliminated
from .gather_elimination import rewrite_gather_eliminations, tpfuse_gather_of
from .linear_fusion import cache_key as linear_fusion_cache_key
from .linear_fusion import fuse_linear_gathers, selection_cache_key
from .pre_grad_losses import might_rewrite, rewrite_cross_entropy
from .records import GatherElimination, GraphReport, NearMiss, Report

log = logging.getLogger("tpfuse.passes")

try:
    from torch._inductor.custom_graph_pass import CustomGraphPass
except ImportError:  # pragma: no cover - torch without the interface (< 2.6)
    class CustomGraphPass:  # type: ignore[no-redef]
        pass


def make_config(**config: Any) -> PassConfig:
    """``config.pass_config`` plus the pattern names checked against the registry (unknown ones fail now)."""
    cfg = pass_config(**config)
    if cfg.patterns is not None:
        pattern_registry.select(cfg.patterns)  # unknown names fail now, not mid-compile
    return cfg


_PACKAGE_DIR = pathlib.Path(__file__).resolve().parent.parent  # tpfuse/
_PACKAGE = __name__.partition(".")[0]


@functools.lru_cache(maxsize=None)
def _pass_sources_hash() -> str:
    """sha256 of the source of every tpfuse module the passes import, transitively.

    Not only ``tpfuse/passes``: the passes decide graphs on facts kept beside the
    kernels (slot alternation, fences, the op's dispatch), and a changed fact must
    not be served a graph decided under the old one (docs/passes.md, "Caching").
    Paths enter relative to the package, so the key does not depend on where it lives."""
    digest = hashlib.sha256()
    for path in sorted(pass_source_files()):
        digest.update(path.relative_to(_PACKAGE_DIR).as_posix().encode() + b"\x00")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def pass_source_files() -> set[pathlib.Path]:
    """The files of ``tpfuse/passes`` and of every tpfuse module they import, transitively.

    Read from the source (every import statement, function-level ones too), not from
    ``sys.modules``: a module imported lazily, on a path this process has not taken yet,
    still decides graphs."""
    todo = [f"{_PACKAGE}.passes"] + [f"{_PACKAGE}.passes.{p.stem}"
                                     for p in (_PACKAGE_DIR / "passes").glob("*.py")]
    found: dict[str, pathlib.Path] = {}
    while todo:
        name = todo.pop()
        path = None if name in found else _module_file(name)
        if path is not None:
            found[name] = path
            todo.extend(_imported_names(name, path))
            # importing a.b.c runs a/__init__.py and a/b/__init__.py first
            todo.extend(name.rsplit(".", depth)[0] for depth in range(1, name.count(".") + 1))
    return set(found.values())


def _module_file(name: str) -> pathlib.Path | None:
    """The source file of tpfuse module ``name``, or None for a name that is no tpfuse module
    (another library, or a class or function imported with ``from module import name``)."""
    top, _, rest = name.partition(".")
    if top != _PACKAGE:
        return None
    base = _PACKAGE_DIR.joinpath(*rest.split(".")) if rest else _PACKAGE_DIR
    for path in (base / "__init__.py", base.with_name(base.name + ".py")):
        if path.is_file():
            return path
    return None


def _imported_names(name: str, path: pathlib.Path) -> set[str]:
    """Every dotted name that could be a module imported by ``name``'s source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_bytes(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
            names.add(base)
            # ``from pkg import sub`` imports the module pkg.sub when there is one
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _op_schema() -> str:
    return str(torch.ops.tpfuse.all_gather_hidden.default._schema)


# --------------------------------------------------------------------------- report store


class _ReportStore:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.graphs: list[GraphReport] = []
        self.reported = 0  # graphs[:reported] were returned by an earlier report()
        self.next_index = 0

    def add(self, graph_report: GraphReport) -> None:
        with self._lock:
            self.graphs.append(graph_report)

    def claim_index(self) -> int:
        with self._lock:
            self.next_index += 1
            return self.next_index - 1

    def take(self, everything: bool) -> Report:
        with self._lock:
            earlier = 0 if everything else self.reported
            graphs = self.graphs[earlier:]
            self.reported = len(self.graphs)
        return Report(graphs, earlier=earlier)

    def clear(self) -> None:
        with self._lock:
            self.graphs, self.reported = [], 0


_STORE = _ReportStore()


def report(all: bool = False) -> Report:  # noqa: A002 - reads well at the call site
    """The records of every graph compiled since the last ``report()`` (or since
    ``enable()``), or with ``all=True`` of every graph since ``enable()`` /
    ``reset_report()``.  Graphs served from Inductor's FX graph cache are
    included, marked ``from_cache``."""
    _collect_cached_graphs()
    return _STORE.take(everything=all)


def reset_report() -> None:
    _STORE.clear()
    cache_records.mark_all_seen()


def _collect_cached_graphs() -> None:
    """Add the stored records of graphs Inductor served from its cache since the last look."""
    for stored in cache_records.loaded_since_last_look():
        graph_report = _cached_graph_report(stored)
        if isinstance(stored, cache_records.Stored):
            _dump_cached(graph_report, stored)
        _STORE.add(graph_report)


def _cached_graph_report(stored) -> GraphReport:
    common = dict(graph_index=_STORE.claim_index(), compile_id="cached", rank=_rank(), from_cache=True)
    if isinstance(stored, str):  # the records could not be read: say so, never stay silent
        return GraphReport(**common, near_misses=[NearMiss("fx_graph_cache", stored, (),
                                                           doc="docs/passes.md#caching")])
    return replace(stored.report, **common, dump_path=None)


def _dump_cached(graph_report: GraphReport, stored) -> None:
    installed = _inductor_config().post_grad_custom_post_pass
    configured = installed.config.dump_dir if isinstance(installed, TpfusePass) else None
    dump_dir = settings.dump_dir(configured)
    if dump_dir:
        missing = ("# (not stored: the cache entry was compiled without TPFUSE_DUMP_DIR, dump_dir "
                   "or TORCH_TRACE; docs/passes.md#caching)")
        graph_report.dump_path = _dump(dump_dir, graph_report, stored.before or missing,
                                       stored.after or missing)


_compilations = itertools.count()


def _compile_context() -> Any:
    """Dynamo's context of the compile in progress in this thread, or None."""
    try:
        from torch._guards import CompileContext

        return CompileContext.try_get()
    except Exception:  # noqa: BLE001 - feature detection of a private API
        return None


def _compile_id() -> str:
    """``"<n>:<frame>/<attempt>"``: Dynamo's compile id, made unique across
    ``torch._dynamo.reset()`` (which restarts Dynamo's numbering) by the number
    of the compile context it belongs to."""
    context = _compile_context()
    try:
        from torch._guards import CompileContext

        cid = CompileContext.current_compile_id()
    except Exception:  # noqa: BLE001 - feature detection of a private API
        context, cid = None, None
    if context is None:
        return f"{next(_compilations)}:-"
    number = getattr(context, "_tpfuse_compilation", None)
    if number is None:
        number = next(_compilations)
        try:
            context._tpfuse_compilation = number
        except AttributeError:  # slotted context: fall back to the plain id
            return str(cid)
    return f"{number}:{cid}"


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


# --------------------------------------------------------------------------- the pass


def run_passes(graph: Graph, config: PassConfig, for_cache: bool = False) -> GraphReport:
    """Find, rewrite (unless dry run), record and dump, for one graph.

    ``for_cache``: Inductor may cache this graph; store the records so that a
    later cache hit still has a report (``cache_records.py``)."""
    _collect_cached_graphs()  # graphs served from the cache before this one come first
    start = time.perf_counter()
    before_autograd = _take_pre_grad_records()
    dump_dir = settings.dump_dir(config.dump_dir)
    tracing = _structured_trace_enabled()
    before = _graph_code(graph) if (dump_dir or tracing) else None

    found = find_hidden_gathers(
        graph, pattern_registry.select(config.patterns), only_after_linear=config.only_after_linear
    )
    if config.dry_run:
        matches = [f.record for f in found.matches]
    else:
        # No graph.lint() here: Inductor lints after its post-grad passes, and the
        # tests lint after every rewrite; at ~3 ms per 1000 nodes it is our largest cost.
        matches = rewrite_hidden_gathers(graph, found.matches)
    eliminations = []
    if config.eliminate_gathers:
        # After the rewrite (every gather form is a tpfuse gather now), before linear fusion and
        # barrier elision, which then see only the gathers that remain.
        matches, eliminations = _eliminate(graph, matches, found.near_misses, config.dry_run)
    if config.fuse_linear and matches:
        # Before barrier elision, which then treats the fused op like any tpfuse gather.
        kept = [m for m in matches if not m.eliminated]
        fused = iter(fuse_linear_gathers(graph, kept, found.near_misses, config.dry_run))
        matches = [m if m.eliminated else next(fused) for m in matches]
    barriers = []
    ops = (torch.ops.tpfuse.all_gather_hidden.default, torch.ops.tpfuse.linear_all_gather_hidden.default)
    if not config.dry_run and any(n.target in ops for n in graph.nodes):  # most graphs have none
        # After the rewrite: decide slot / entry barrier / zero-copy of every tpfuse gather.
        barriers = decide_barriers(graph, elide=config.elide_barriers, zero_copy=config.zero_copy)
        apply_barrier_decisions(graph, barriers)
        matches = attach_to_matches(graph, matches, barriers)

    graph_report = GraphReport(
        graph_index=_STORE.claim_index(),
        compile_id=_compile_id(),
        rank=_rank(),
        matches=matches,
        near_misses=[r for r in before_autograd if isinstance(r, NearMiss)] + found.near_misses,
        dry_run=config.dry_run,
        barriers=barriers,
        other_collectives=found.other_collectives,
        devices=_gather_devices(graph) if barriers else {},
        eliminations=[r for r in before_autograd if isinstance(r, GatherElimination)] + eliminations,
    )
    graph_report.pass_ms = (time.perf_counter() - start) * 1e3
    after = _graph_code(graph) if before is not None else None
    if for_cache and cache_records.cache_in_use():
        cache_records.store(graph_report, before, after)
    if before is not None:
        if dump_dir:
            graph_report.dump_path = _dump(dump_dir, graph_report, before, after)
        if tracing:
            _trace_artifacts(before, after, graph_report)
    _STORE.add(graph_report)
    if matches or graph_report.near_misses or graph_report.eliminations:
        log.info("%s", Report([graph_report]))
    return graph_report


def _eliminate(graph: Graph, matches: list, near_misses: list, dry_run: bool) -> tuple[list, list]:
    """Gather elimination (gather_elimination.py): (the matches, marked where their gather went;
    the elimination records).  A dry run records what would go and changes nothing."""
    found = find_gather_eliminations(graph, ELIMINATIONS.ordered())
    near_misses += found.near_misses
    if not found.found:
        return matches, []
    if dry_run:
        return matches, [f.record for f in found.found]
    gathers = tpfuse_gather_of(graph, matches)
    records = rewrite_gather_eliminations(graph, found.found)
    return mark_eliminated(matches, gathers, records), records


def _gather_devices(graph: Graph) -> dict[str, str]:
    """Device type of every tpfuse gather: CPU tensors run gloo, CUDA tensors flag, multimem, p2p or nccl."""
    from . import graph_facts as facts

    ops = (torch.ops.tpfuse.all_gather_hidden.default, torch.ops.tpfuse.linear_all_gather_hidden.default)
    devices = {}
    for node in graph.nodes:
        value = facts.val(node) if node.target in ops else None
        if isinstance(value, torch.Tensor):
            devices[node.name] = value.device.type
    return devices


class TpfusePass(CustomGraphPass):
    """The object installed as Inductor's ``post_grad_custom_post_pass``.

    Runs the tpfuse passes, then whatever pass was installed before (chained,
    restored by ``disable()``)."""

    def __init__(self, config: PassConfig, previous: Any = None) -> None:
        self.config = config
        self.previous = previous

    def __call__(self, graph: Graph) -> None:
        run_passes(graph, self.config, for_cache=True)
        for inner in _as_list(self.previous):
            inner(graph)

    def uuid(self) -> Any:
        # A rank-dependent pattern builds a different graph on each rank from the same
        # input graph: the rank must then be part of the key, or ranks sharing a cache
        # directory would be served each other's graphs.
        rank_part = ""
        if any(p.rank_dependent for p in pattern_registry.select(self.config.patterns)):
            rank_part = f"rank={_rank()}"
        return _chained_uuid((
            _pass_sources_hash(),
            _op_schema(),
            self.config.cache_key(),
            pattern_registry.REGISTRY.cache_key(),
            ELIMINATIONS.cache_key() if self.config.eliminate_gathers else "",
            linear_fusion_cache_key() if self.config.fuse_linear else "",
            selection_cache_key(),  # the tuned config the reports' planned backends follow
            rank_part,
        ), self.previous)

    def __repr__(self) -> str:
        return f"TpfusePass({self.config}, previous={self.previous!r})"


class TpfusePreGradPass(CustomGraphPass):
    """The object installed as Inductor's ``pre_grad_custom_pass``: the training loss's rewrite
    before AOTAutograd (``pre_grad_losses.py``) where ``eliminate_gathers`` is on, then whatever
    pass was installed before (chained, restored by ``disable()``)."""

    def __init__(self, config: PassConfig, previous: Any = None) -> None:
        self.config = config
        self.previous = previous

    def __call__(self, graph: Graph) -> None:
        if self.config.eliminate_gathers:
            run_pre_grad(graph, self.config)
        for inner in _as_list(self.previous):
            inner(graph)

    def uuid(self) -> Any:
        # Torch that looks up its AOTAutograd cache before the pre-grad passes run keys the
        # entry by this uuid, not by the rewritten graph: it covers what decides the rewrite.
        ops = (torch.ops.tpfuse.cross_entropy_hidden.default, torch.ops.tpfuse.sum_grad_over_ranks.default)
        return _chained_uuid(("pre_grad", _pass_sources_hash(), *(str(op._schema) for op in ops),
                              self.config.cache_key()), self.previous)

    def __repr__(self) -> str:
        return f"TpfusePreGradPass({self.config}, previous={self.previous!r})"


def _chained_uuid(parts: tuple, previous: Any) -> str | None:
    """sha256 of ``parts`` and of the chained passes' uuids; None when one has none (a plain
    callable has no identity Inductor can hash: caching it would be unsafe, so the chain opts
    out, as Inductor does for it alone)."""
    inner_uuids = []
    for inner in _as_list(previous):
        inner_uuid = getattr(inner, "uuid", None)
        if inner_uuid is None:
            return None
        inner_uuids.append(str(inner_uuid()))
    digest = hashlib.sha256()
    for part in (*parts, *inner_uuids):
        digest.update(part.encode())
        digest.update(b"\x00")
    return digest.hexdigest()


def run_pre_grad(graph: Graph, config: PassConfig) -> list[str]:
    """The training loss's rewrite on one Dynamo graph (a dry run says what it would rewrite);
    its records go to the report with the next graph the post-grad pass runs on in this
    compile.  Returns ``rewrite_cross_entropy``'s lines."""
    if not might_rewrite(graph):
        return []  # most graphs: no loss, or nothing that gathers: no loss of one to rewrite or to report
    records: list = []
    lines = rewrite_cross_entropy(graph, dry_run=config.dry_run, records=records)
    if records:
        _hand_on_pre_grad_records(records)
    return lines


# The pre-grad records travel with the forward graph of the same compile, the first one the
# post-grad pass sees after them: reported with it, and stored with it for a cache hit, which
# replays only what was recorded while a post-grad graph compiled (cache_records.py).
# They wait on Dynamo's compile context, so records of a compile whose forward graph was
# served from the cache (its stored records carry them) end with that compile, unlisted.
_PRE_GRAD_ATTR = "_tpfuse_pre_grad_records"


def _hand_on_pre_grad_records(records: list) -> None:
    context = _compile_context()
    try:
        setattr(context, _PRE_GRAD_ATTR, getattr(context, _PRE_GRAD_ATTR, []) + records)
    except AttributeError:  # no compile (a graph rewritten by hand) or a slotted context
        _STORE.add(GraphReport(graph_index=_STORE.claim_index(), compile_id=_compile_id(), rank=_rank(),
                               near_misses=[r for r in records if isinstance(r, NearMiss)],
                               eliminations=[r for r in records if isinstance(r, GatherElimination)]))


def _take_pre_grad_records() -> list:
    context = _compile_context()
    records = getattr(context, _PRE_GRAD_ATTR, None) if context is not None else None
    if records:
        setattr(context, _PRE_GRAD_ATTR, [])
    return records or []


def _as_list(passes: Any) -> list:
    if passes is None:
        return []
    return list(passes) if isinstance(passes, (list, tuple)) else [passes]


# --------------------------------------------------------------------------- public API


def _inductor_config():
    import torch._inductor.config as inductor_config

    return inductor_config


def _without_tpfuse(installed: Any) -> Any:
    return installed.previous if isinstance(installed, (TpfusePass, TpfusePreGradPass)) else installed


# Inductor's config entry of each tpfuse pass, and the pass installed there.
_POST_GRAD_KEY = "post_grad_custom_post_pass"
_PRE_GRAD_KEY = "pre_grad_custom_pass"


def _tpfuse_passes(cfg: PassConfig) -> dict:
    """config entry -> how ``enable()`` changes what is installed there (ours first, the rest chained)."""
    return {_POST_GRAD_KEY: lambda installed: TpfusePass(cfg, _without_tpfuse(installed)),
            _PRE_GRAD_KEY: lambda installed: TpfusePreGradPass(cfg, _without_tpfuse(installed))}


def enable(**config: Any) -> None:
    """Install the tpfuse passes into Inductor's post-grad hook, and the training loss's rewrite
    into its pre-grad hook, for every later compile, in every thread of the process
    (docs/api.md, "Threads").

    A pass the user installed in either hook keeps running after ours; ``disable()``
    restores it.  Graphs compiled before ``enable()`` are not recompiled (call
    ``torch._dynamo.reset()`` for that)."""
    cfg = make_config(**config)
    allow_funcol_gather_tracing()
    inductor_lowering.register()
    for key, change in _tpfuse_passes(cfg).items():
        _change_installed(key, change)
    reset_report()


def disable() -> None:
    """Remove the tpfuse passes from every thread; whatever was installed before ``enable()`` is restored."""
    for key in (_POST_GRAD_KEY, _PRE_GRAD_KEY):
        _change_installed(key, _without_tpfuse)


def is_enabled() -> bool:
    """Whether a compile in the calling thread runs the passes."""
    return isinstance(_inductor_config().post_grad_custom_post_pass, TpfusePass)


@contextlib.contextmanager
def enabled(**config: Any) -> Iterator[None]:
    """``with tpfuse.enabled(**config):`` -- enable for the block, in every thread as ``enable()``
    does, then restore exactly what was installed before."""
    saved = _installed()
    enable(**config)
    try:
        yield
    finally:
        _restore_installed(saved)


# Where Inductor keeps the passes.  torch 2.11 keeps one value per process:
# an assignment reaches every thread.  Later torch keeps each assigned value in a
# ContextVar (torch/utils/_config_module.py), so an assignment reaches only the
# assigning thread, and every other thread reads the entry's defaults: a plain
# assignment in enable() would leave compiles in worker threads without the passes.
# Changed outside Inductor's setattr, the entry's per-thread caches of the config dict
# need no notice: they serve only save_config and the cache key's config, and both
# leave these entries out (the key takes the passes' uuids instead).
try:
    from torch.utils._config_module import _UNSET_SENTINEL
except ImportError:  # pragma: no cover - no config module: _per_thread_entry() finds no entry
    _UNSET_SENTINEL = object()


def _per_thread_entry(key: str):
    """Inductor's config entry ``key`` where its value is per thread, else None."""
    entry = getattr(_inductor_config(), "_config", {}).get(key)
    per_thread = isinstance(getattr(entry, "user_override", None), contextvars.ContextVar)
    return entry if per_thread and hasattr(entry, "env_value_default") else None


def _change_installed(key: str, change) -> None:
    """Replace the pass installed in config entry ``key`` by ``change(installed)``, for every thread."""
    ic = _inductor_config()
    entry = _per_thread_entry(key)
    if entry is None:
        setattr(ic, key, change(getattr(ic, key)))
        return
    # The process-wide value: what every thread without a value of its own reads.  It is
    # the slot an environment variable would fill (Inductor reads it below a thread's own
    # value); the entry's ``default`` would not do: Inductor deep-copies a mutable default
    # into the reading thread's own value, which would then outlive disable().
    process_wide = entry.default if entry.env_value_default is _UNSET_SENTINEL else entry.env_value_default
    entry.env_value_default = change(process_wide)
    if entry.user_override.get() is not _UNSET_SENTINEL:
        # This thread assigned a value (or left one by ``config.patch``): it hides the
        # process-wide one here, so it is changed too, keeping the pass it chains.
        setattr(ic, key, change(entry.user_override.get()))


def _installed() -> dict:
    """What ``_change_installed`` changes in each entry, raw (a thread's "no value" included), to restore exactly."""
    saved = {}
    for key in (_POST_GRAD_KEY, _PRE_GRAD_KEY):
        entry = _per_thread_entry(key)
        saved[key] = ((getattr(_inductor_config(), key), None) if entry is None
                      else (entry.user_override.get(), entry.env_value_default))
    return saved


def _restore_installed(saved: dict) -> None:
    for key, (thread_value, process_wide) in saved.items():
        entry = _per_thread_entry(key)
        if entry is None:
            setattr(_inductor_config(), key, thread_value)
            continue
        entry.env_value_default = process_wide
        # Raw, as Inductor's own closure patcher does: the "no value" marker cannot be assigned.
        entry.user_override.set(thread_value)


def backend(inner: str = "inductor", **config: Any):
    """A ``torch.compile`` backend running the tpfuse passes, without touching global config.

    ``inner="inductor"``: Inductor with the passes as its post-grad pass and the training loss's
    rewrite as its pre-grad pass; ``torch.compile``'s ``mode`` (e.g. ``"reduce-overhead"``) and
    ``options`` apply as they do to Inductor.
    ``inner="aot_eager"``: the pre-grad rewrite, then AOTAutograd graphs, rewritten, run eagerly
    (no Inductor).

    Each call returns a new backend, so ``torch.compile(f, backend=tpfuse.backend())``
    never reuses code that Dynamo compiled for ``f`` with another backend."""
    cfg = make_config(**config)
    allow_funcol_gather_tracing()
    inductor_lowering.register()
    if inner == "inductor":
        def tpfuse_inductor(gm, example_inputs, mode=None, options=None):
            from torch._inductor.compile_fx import compile_fx

            ic = _inductor_config()
            ours = {key: change(getattr(ic, key)) for key, change in _tpfuse_passes(cfg).items()}
            patches = {**_mode_options(mode), **(options or {}), **ours}
            return compile_fx(gm, example_inputs, config_patches=patches)

        return tpfuse_inductor
    if inner == "aot_eager":
        from torch._dynamo.backends.common import aot_autograd

        try:
            from torch._functorch.aot_autograd import make_boxed_func
        except ImportError:  # pragma: no cover
            from functorch.compile import make_boxed_func

        def rewrite_then_run(gm, example_inputs):
            run_passes(gm.graph, cfg)
            gm.recompile()
            return make_boxed_func(gm.forward)

        aot = aot_autograd(fw_compiler=rewrite_then_run, bw_compiler=rewrite_then_run)

        def pre_grad_then_aot(gm, example_inputs, **kwargs):
            if cfg.eliminate_gathers and run_pre_grad(gm.graph, cfg):
                gm.recompile()
            return aot(gm, example_inputs, **kwargs)

        return pre_grad_then_aot
    raise ValueError(f"tpfuse: backend inner={inner!r}; accepted are 'inductor' and 'aot_eager'")


def _mode_options(mode: str | None) -> dict:
    """Inductor's config for a ``torch.compile`` mode (what ``mode=`` does with the Inductor backend)."""
    if mode is None:
        return {}
    from torch._inductor import list_mode_options

    return dict(list_mode_options(mode))


# --------------------------------------------------------------------------- dumps


def _graph_code(graph: Graph) -> str:
    return graph.python_code(root_module="self").src


def _dump(dump_dir: str, graph_report: GraphReport, before: str, after: str) -> str:
    directory = pathlib.Path(dump_dir)
    directory.mkdir(parents=True, exist_ok=True)
    cid = graph_report.compile_id.replace("/", "_").replace(":", "_")
    path = directory / f"rank{graph_report.rank}_graph{graph_report.graph_index:03d}_{cid}.py"
    summary = "\n".join("# " + line for line in str(Report([graph_report])).splitlines())
    path.write_text(
        f"# tpfuse before/after: rank {graph_report.rank}, graph {graph_report.graph_index}, "
        f"compile {graph_report.compile_id}\n{summary}\n\n"
        f"# ===== before tpfuse =====\n{before}\n\n# ===== after tpfuse =====\n{after}\n"
    )
    return str(path)


def _structured_trace_enabled() -> bool:
    """``TORCH_TRACE`` (tlparse) is on: emit before/after graphs as artifacts there."""
    trace_log = getattr(getattr(torch._logging, "_internal", None), "trace_log", None)
    return bool(trace_log is not None and trace_log.handlers and hasattr(torch._logging, "trace_structured"))


def _trace_artifacts(before: str, after: str, graph_report: GraphReport) -> None:
    for name, payload in (("tpfuse_before", before), ("tpfuse_after", after),
                          ("tpfuse_report", str(Report([graph_report])))):
        torch._logging.trace_structured(
            "artifact",
            metadata_fn=lambda name=name: {"name": name, "encoding": "string"},
            payload_fn=lambda payload=payload: payload,
        )
