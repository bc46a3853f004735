"""ONNX Runtime sessions for a bundle: providers, IO binding and a device-resident decoder cache.

Every run goes through IO binding, on every provider. The K/V cache, the cross-attention K/V
and the encoder mask are OrtValues living on the session's device (GPU memory on CUDA): a
step's `present` is fed back as the next step's `past` without touching the host, and beam
reordering / dropping finished rows runs the bundle's reorder graph on that same device.
Only each step's top-k values and indices are bound to host memory.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

import numpy as np
import onnxruntime as ort

from nmt import bundle as fmt
from nmt.bundle import BundleError, Manifest
from nmt.errors import UserError
from serve.engine import native
from serve.engine.slots import SlotCache

log = logging.getLogger(__name__)

GRAPH_OPTIMIZATION = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
CUDA_EP, CPU_EP = "CUDAExecutionProvider", "CPUExecutionProvider"
NUMPY_DTYPE = {"tensor(float)": np.float32, "tensor(float16)": np.float16}

Feed: TypeAlias = "np.ndarray | ort.OrtValue"  # a host array or a (device) OrtValue


class DeviceError(UserError, RuntimeError):
    """The requested device cannot be used (e.g. device='cuda' on a machine without a usable GPU)."""


@dataclass(frozen=True)
class Device:
    """Where sessions run and the cache lives, in IO binding terms ('cpu' or 'cuda', id)."""

    type: str
    id: int = 0

    @property
    def provider(self) -> str:
        return CUDA_EP if self.type == "cuda" else CPU_EP


def cuda_driver_present() -> bool:
    """True when an NVIDIA driver is loadable. onnxruntime-gpu lists the CUDA provider on every
    machine, so the provider list alone cannot tell a GPU host from a CPU-only one."""
    if CUDA_EP not in ort.get_available_providers():
        return False
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def requested_device(device: str) -> Device | None:
    """Parse 'auto' | 'cpu' | 'cuda' | 'cuda:N'; None means auto (CUDA when usable, else CPU)."""
    if device == "auto":
        return None
    if device == "cpu":
        return Device("cpu")
    if device == "cuda" or device.startswith("cuda:"):
        index = device.partition(":")[2] or "0"
        if not index.isdigit():
            raise DeviceError(f"invalid device {device!r}: expected cuda or cuda:N")
        return Device("cuda", int(index))
    raise DeviceError(f"invalid device {device!r}: expected auto, cpu, cuda or cuda:N")


def session_options(intra_op_threads: int | None, inter_op_threads: int | None,
                    graph_optimization: str, allow_spinning: bool | None = False) -> ort.SessionOptions:
    if graph_optimization not in GRAPH_OPTIMIZATION:
        raise ValueError(f"graph_optimization must be one of {', '.join(GRAPH_OPTIMIZATION)}, "
                         f"got {graph_optimization!r}")
    so = ort.SessionOptions()
    so.graph_optimization_level = GRAPH_OPTIMIZATION[graph_optimization]
    if intra_op_threads is not None:
        so.intra_op_num_threads = intra_op_threads
    if inter_op_threads is not None:
        so.inter_op_num_threads = inter_op_threads
    so.log_severity_level = 3  # warnings about unused initializers etc. are noise for a server
    if allow_spinning is not None:
        # Off by default: a bundle is three sessions with a thread pool each, plus the Python loop
        # between runs; pools spinning while idle steal the cores the running one needs
        # (bench/levers.py, 2 threads: 2.0-2.8x). None keeps ORT's default (spin).
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "1" if allow_spinning else "0")
    return so


def providers_for(device: Device) -> list:
    if device.type == "cuda":
        # The CPU provider stays as a fallback for the few ops CUDA lacks (shape arithmetic).
        return [(CUDA_EP, {"device_id": device.id}), CPU_EP]
    return [CPU_EP]


class Graph:
    """One ONNX graph: runs it through IO binding, host arrays in, outputs where asked."""

    def __init__(self, path: Path, options: ort.SessionOptions, device: Device, expected_inputs: list[str],
                 model: bytes | None = None):
        """model: the graph at `path` as rewritten in memory (serve.engine.native), to load instead."""
        try:
            self.session = ort.InferenceSession(str(path) if model is None else model, sess_options=options,
                                                providers=providers_for(device))
        except Exception as e:  # onnxruntime raises its own exception types for unreadable models
            raise BundleError(f"{path}: cannot be loaded by ONNX Runtime ({type(e).__name__}: {e})") from None
        if model is not None and device.type == "cpu":
            # ORT's Python session keeps the bytes it was made from, only to re-create itself when a GPU
            # provider fails (never on CPU): 27 MB per fp32 slot decoder session held for nothing.
            self.session._model_bytes = None
        self.device = device
        names = [i.name for i in self.session.get_inputs()]
        missing = [n for n in expected_inputs if n not in names]
        if missing:
            raise BundleError(f"{path}: graph lacks inputs {', '.join(missing)}")
        self.input_types = {i.name: i.type for i in self.session.get_inputs()}

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def release(self) -> None:
        """Drop the session (its weights and memory arena); the graph cannot run after this."""
        self.__dict__.pop("session", None)

    def run(self, feeds: dict[str, Feed], device_outputs: list[str], host_outputs: Sequence[str] = (),
            bound: dict[str, ort.OrtValue] | None = None) -> dict[str, ort.OrtValue]:
        """Bind feeds (OrtValues stay where they are, arrays are copied in by ORT), run, and return
        `device_outputs` as OrtValues on the session's device and `host_outputs` in host memory;
        `bound` outputs are written into the given OrtValues (not returned)."""
        binding = self.session.io_binding()
        for name, value in (bound or {}).items():
            binding.bind_ortvalue_output(name, value)
        for name, value in feeds.items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, value)
        for name in device_outputs:
            binding.bind_output(name, self.device.type, self.device.id)
        for name in host_outputs:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        if host_outputs and self.device.type != "cpu":
            binding.synchronize_outputs()  # the host copies must be complete before numpy reads them
        names = [*(bound or {}), *device_outputs, *host_outputs]  # get_outputs() keeps binding order
        return {n: v for n, v in zip(names, binding.get_outputs()) if n not in (bound or {})}


def slot_graphs(path: Path, names: list[str], device: Device, threads: int | None,
                inter_op_threads: int | None, optimization: str, spinning: bool | None, parts: bool,
                model: bytes | None) -> tuple[Graph, Graph | None]:
    """The slot decoder on `threads` threads and (parts) on one thread, for steps split by rows;
    model: the graph rewritten for serve.engine.native's kernels, registered in both sessions."""
    def load(n: int | None) -> Graph:
        options = session_options(n, inter_op_threads, optimization, spinning)
        if model is not None:
            native.register(options)
        return Graph(path, options, device, names, model)
    return load(threads), load(1) if parts else None


class Runtime:
    """The bundle's three graphs on one device, plus the decoder-step counter."""

    def __init__(self, bundle_dir: Path, manifest: Manifest, device: str = "auto",
                 intra_op_threads: int | None = None, inter_op_threads: int | None = None,
                 graph_optimization: str = "all", allow_spinning: bool | None = False,
                 slot_cache: bool = True, native_kernels: bool = True, greedy_head: bool = True):
        options = session_options(intra_op_threads, inter_op_threads, graph_optimization, allow_spinning)
        wanted = requested_device(device)
        self.device = wanted or (Device("cuda") if cuda_driver_present() else Device("cpu"))
        n = self.n_layers = manifest.n_decoder_layers
        encoder_inputs = [fmt.INPUT_IDS, fmt.ATTENTION_MASK]
        self.encoder = Graph(bundle_dir / fmt.ENCODER_FILE, options, self.device, encoder_inputs)
        if self.device.type == "cuda" and self.encoder.provider != CUDA_EP:
            # ORT falls back to CPU silently when the CUDA libraries fail to load.
            if wanted is not None:
                raise DeviceError(f"device={device!r} requested but ONNX Runtime could not start CUDA "
                                  f"(providers: {self.encoder.session.get_providers()})")
            self.device = Device("cpu")
            self.encoder = Graph(bundle_dir / fmt.ENCODER_FILE, options, self.device, encoder_inputs)
        self.decoder = Graph(bundle_dir / fmt.DECODER_FILE, options, self.device, fmt.decoder_input_names(n))
        self.reorder = Graph(bundle_dir / fmt.REORDER_FILE, options, self.device, fmt.reorder_input_names(n))
        # The slot decoder (serve.engine.slots) on CPU, when the bundle has it and it is not turned off.
        self.slot_decoder: Graph | None = None
        self.slot_parts: Graph | None = None  # the same graph on one thread, for steps split by rows
        self.native_kernels = False  # the slot decoder runs on serve.engine.native's kernels
        # Its greedy_head variant (serve.engine.native): steps that need no scores (greedy without
        # return_scores) take their best tokens from int8 estimates with error bounds, checked in float32.
        self.slot_head: Graph | None = None
        self.slot_head_parts: Graph | None = None
        self.copy_threads = intra_op_threads or os.cpu_count() or 1  # host threads: see copy_pool below
        if slot_cache and self.device.type == "cpu" and fmt.SLOT_CACHE in manifest.optimizations:
            path, names = bundle_dir / fmt.DECODER_SLOTS_FILE, fmt.slot_decoder_input_names(n)
            # On our compiled kernels when they are built (serve.engine.native); should that graph fail to
            # load (a library that does not fit this ONNX Runtime), the graph as exported.
            model, head = (native.accelerated(path, greedy_head) if native_kernels else None) or (None, None)
            parts = self.copy_threads > 1
            load = functools.partial(slot_graphs, path, names, self.device, intra_op_threads,
                                     inter_op_threads, graph_optimization, allow_spinning, parts)
            try:
                self.slot_decoder, self.slot_parts = load(model)
            except Exception as e:  # ONNX Runtime's own exception types
                if model is None:
                    raise
                log.warning("the slot decoder on serve.engine.native's kernels did not load (%s); "
                            "ONNX Runtime's kernels instead", e)
                model = head = None
                self.slot_decoder, self.slot_parts = load(None)
            self.native_kernels = model is not None
            if head is not None:
                try:
                    self.slot_head, self.slot_head_parts = load(head)
                except Exception as e:
                    log.warning("the slot decoder's greedy head did not load (%s); greedy steps use the "
                                "full vocabulary projection", e)
        # Its greedy steps read log_probs and take the argmax on the host (serve.engine.slots.best_of),
        # unless the graph has no log_probs (on serve.engine.native's LogSoftmaxTopK: its top-k does it).
        self.slot_host_argmax = fmt.SLOT_HOST_ARGMAX in manifest.optimizations
        self.vocab_size = manifest.vocab_size  # the log_probs width: the slot decoder's, when it has one
        if self.slot_decoder is not None:
            outputs = self.slot_decoder.session.get_outputs()
            width = next((o.shape[-1] for o in outputs if o.name == fmt.LOG_PROBS), None)
            self.vocab_size = width if isinstance(width, int) else self.vocab_size
            self.slot_host_argmax = self.slot_host_argmax and any(o.name == fmt.LOG_PROBS for o in outputs)
        past_type = self.decoder.input_types[fmt.past_name(0, "decoder", "key")]
        self.cache_dtype = NUMPY_DTYPE.get(past_type, np.float32)
        # Alignments need their own graph (a bundle without it serves everything else). It loads on
        # the first request that asks for alignments: a server that never does pays no memory for it.
        self.has_alignments = fmt.DECODER_ALIGNMENTS_FILE in manifest.files
        self._alignments_path, self._options = bundle_dir / fmt.DECODER_ALIGNMENTS_FILE, options
        self._decoder_alignments: Graph | None = None
        self._load_lock = threading.Lock()
        self.n_heads, self.head_dim = manifest.n_heads, manifest.head_dim
        # The decoder takes cross K/V with one row per source for equal groups of rows (beam search):
        # then only the self-attention cache follows the beams (DecoderCache.keep).
        self.grouped_cross = fmt.GROUPED_CROSS_KV in manifest.optimizations
        self.steps = 0
        self._steps_lock = threading.Lock()
        # Beam reorders copy self-attention rows on the host (serve.engine.slots); with more than one
        # intra-op thread the copies are split over that many threads (numpy releases the GIL while
        # copying), as the session's own pool idles between runs. Batch-64 beam 4, 2 threads: the
        # copies were 12% of the time and run 1.7x faster split in two. Steps of many rows run as
        # row parts on these threads too (serve.engine.slots.row_parts).
        self.copy_pool = (ThreadPoolExecutor(self.copy_threads - 1, thread_name_prefix="nmt-copy")
                          if self.slot_decoder is not None and self.copy_threads > 1 else None)

    @property
    def provider(self) -> str:
        return self.encoder.provider

    def release(self) -> None:
        """Free every session: a version replaced by a reload, once its last request finished."""
        with self._load_lock:
            graphs = (self.encoder, self.decoder, self.reorder, self._decoder_alignments, self.slot_decoder,
                      self.slot_parts, self.slot_head, self.slot_head_parts)
            for graph in graphs:
                if graph is not None:
                    graph.release()
            self._decoder_alignments = None
            if self.copy_pool is not None:
                self.copy_pool.shutdown(wait=False)
        return_freed_memory()

    @property
    def decoder_alignments(self) -> Graph:
        with self._load_lock:
            if self._decoder_alignments is None:
                self._decoder_alignments = Graph(self._alignments_path, self._options, self.device,
                                                 fmt.decoder_input_names(self.n_layers))
            return self._decoder_alignments

    def count_step(self) -> None:
        with self._steps_lock:
            self.steps += 1

    def to_device(self, array: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device.type, self.device.id)

    def start(self, src_ids: np.ndarray, src_mask: np.ndarray, alignments: bool = False,
              capacity: tuple[int, int] | None = None, single: bool = False) -> DecoderCache | SlotCache:
        """Encode a padded batch (B, S) and return its decoder state: cross K/V on device, empty past.
        The slot decoder's cache when there is one (sized for `capacity` (rows, tokens) when given;
        `single`: stepped on one thread, see SlotCache), unless the rows will want alignments."""
        n = self.n_layers
        cross_out = [fmt.present_name(i, "encoder", w) for i in range(n) for w in ("key", "value")]
        out = self.encoder.run({fmt.INPUT_IDS: src_ids, fmt.ATTENTION_MASK: src_mask}, cross_out)
        cache = {fmt.past_name(i, "encoder", w): out[fmt.present_name(i, "encoder", w)]
                 for i in range(n) for w in ("key", "value")}
        if self.slot_decoder is not None and not alignments:
            arrays = {name: value.numpy() for name, value in cache.items()}  # host memory: views, no copy
            return SlotCache(self, arrays, np.ascontiguousarray(src_mask, dtype=bool), list(out.values()),
                             capacity, single)
        # The first step's past is empty; a zero-size host array binds on every provider (ORT
        # copies its zero bytes), from then on each step's present stays on the device.
        shape = (src_ids.shape[0], self.n_heads, 0, self.head_dim)
        empty = np.zeros(shape, self.cache_dtype)  # (B, H, 0, Dh)
        for i in range(n):
            for w in ("key", "value"):
                cache[fmt.past_name(i, "decoder", w)] = empty
        cache[fmt.ENCODER_ATTENTION_MASK] = self.to_device(src_mask)
        return DecoderCache(self, cache, src_ids.shape[0])


class DecoderCache:
    """The running batch's device-resident decoder state; the search drives it row by row.

    Rows may be of different ages (continuous batching joins new rows to a running batch): row r
    has fed `lengths[r]` tokens, which sit in the last `lengths[r]` of the `position` slots of the
    self-attention past (left padding, masked out). A batch whose rows all started together has
    every length equal to `position`: positions are then one number and the mask all True.
    """

    def __init__(self, runtime: Runtime, cache: dict[str, Feed], rows: int):
        self.runtime, self.cache, self.rows, self.position = runtime, cache, rows, 0
        # Rows per cross-attention row: row r reads cross K/V row r // group (the beams of a source
        # share one copy). Always 1 unless keep() was asked for groups and the bundle accepts them.
        self.group = 1
        self.lengths = np.zeros(rows, dtype=np.int64)  # (R,) tokens fed per row
        # A decoder layer index (negative from the end): set, every step also fetches that layer's
        # head-averaged cross-attention and keeps its argmax per row. None: a normal step.
        self.alignment_layer: int | None = None
        self.alignment: np.ndarray | None = None  # (R,) last step's most attended source index per row
        n = runtime.n_layers
        self.self_pairs = [(fmt.present_name(i, "decoder", w), fmt.past_name(i, "decoder", w))
                           for i in range(n) for w in ("key", "value")]
        self.self_past = {past for _, past in self.self_pairs}

    def step(self, tokens: np.ndarray, k: int, scores: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Feed one token per row (R,) and return the k best next tokens: values (log-probs), ids (R, k).
        (scores: see StepCache; this graph always computes the log-probs.)"""
        rt, R, t = self.runtime, self.rows, self.position
        feeds: dict[str, Feed] = dict(self.cache)
        feeds[fmt.INPUT_IDS] = tokens.astype(np.int64).reshape(R, 1)  # (R, 1)
        feeds[fmt.POSITION_IDS] = self.lengths.reshape(R, 1)  # (R, 1) each row's own position
        # Slot j of row r holds one of its tokens when j >= t - lengths[r]; the new token's slot (t) always.
        feeds[fmt.SELF_ATTENTION_MASK] = (np.arange(t + 1)[None, :]
                                          >= (t - self.lengths)[:, None])[:, None, :]  # (R, 1, t+1)
        feeds[fmt.TOP_K] = np.array([k], dtype=np.int64)
        presents = [present for present, _ in self.self_pairs]
        host = [fmt.TOPK_VALUES, fmt.TOPK_INDICES]
        if self.alignment_layer is not None:
            host.append(fmt.CROSS_ATTENTION)  # only then: a normal step never copies it to the host
        # The engine refuses alignments for a bundle without their graph before a step runs.
        graph = rt.decoder_alignments if self.alignment_layer is not None else rt.decoder
        out = graph.run(feeds, presents, host)
        rt.count_step()
        if self.alignment_layer is not None:
            attn = out[fmt.CROSS_ATTENTION].numpy()[:, self.alignment_layer, -1, :]  # (R, S)
            self.alignment = attn.argmax(axis=-1)  # (R,) padded sources get ~0 weight
        for present, past in self.self_pairs:
            self.cache[past] = out[present]  # the cache never leaves the device
        self.position = t + 1
        self.lengths = self.lengths + 1
        return out[fmt.TOPK_VALUES].numpy(), out[fmt.TOPK_INDICES].numpy()

    def keep(self, rows: np.ndarray, group: int = 1) -> None:
        """New batch row j = old row rows[j]: reorders beams, duplicates, and drops finished rows.

        group > 1: the caller lays the new rows out in equal groups of `group` rows that read the
        same source (a source's beams); with a bundle that accepts grouped cross K/V, the cross K/V
        and encoder mask then keep one row per group and move only when the set of sources changes.
        """
        rows = rows.astype(np.int64)
        cross = rows // self.group  # (R',) the cross row every new row reads
        new_group = 1
        if group > 1 and self.runtime.grouped_cross and len(rows) % group == 0:
            per = cross.reshape(-1, group)  # (R'/g, g)
            if (per == per[:, :1]).all():
                cross, new_group = per[:, 0], group
        cross_names = [n for n in self.cache if n not in self.self_past]
        if new_group == 1 and self.group == 1:  # the plain case: one reorder run for everything
            self.cache = self.reordered(rows, list(self.cache), (), self.rows)
        else:
            self_names = list(self.self_past)
            moved = self.reordered(rows, self_names, cross_names, self.rows)
            if len(cross) != self.cross_rows or (cross != np.arange(len(cross))).any():
                moved.update(self.reordered(cross, cross_names, self_names, self.cross_rows))
            else:
                moved.update({n: self.cache[n] for n in cross_names})
            self.cache = {n: moved[n] for n in self.cache}
        self.rows, self.group = len(rows), new_group
        self.lengths = self.lengths[rows]

    @property
    def cross_rows(self) -> int:
        return self.rows // self.group

    def reordered(self, index: np.ndarray, names: list[str], skipped: Sequence[str], rows: int
                  ) -> dict[str, Feed]:
        """Run the reorder graph over `names` (tensors of `rows` rows). The graph takes every cache
        tensor: the `skipped` ones get zero-size stand-ins of as many rows (a gather of nothing)."""
        feeds: dict[str, Feed] = {fmt.REORDER_INDEX: index}
        feeds.update({n: self.cache[n] for n in names})
        rt = self.runtime
        for n in skipped:
            if n == fmt.ENCODER_ATTENTION_MASK:
                feeds[n] = np.zeros((rows, 0), bool)  # (rows, 0)
            else:
                feeds[n] = np.zeros((rows, rt.n_heads, 0, rt.head_dim), rt.cache_dtype)  # (rows, H, 0, Dh)
        out = self.runtime.reorder.run(feeds, [fmt.REORDERED_PREFIX + n for n in names])
        return {n: out[fmt.REORDERED_PREFIX + n] for n in names}

    # -- continuous batching: rows of different ages in one batch -----------------------------
    def join(self, other: DecoderCache) -> None:
        """Append `other`'s rows (just encoded, nothing fed yet) after this batch's rows.

        Cross-attention K/V and the encoder mask are padded to the longer source (masked), the
        newcomers' self-attention past to this batch's length (left padding, masked by `lengths`).
        The tensors are joined in host memory: once per admission, never per step.
        """
        if other.position != 0:
            raise ValueError("only rows that have not been fed yet can join a running batch")
        if self.group != 1 or other.group != 1:
            raise ValueError("grouped cross-attention rows cannot join a running batch")
        if self.rows == 0:
            self.cache, self.rows, self.lengths = other.cache, other.rows, other.lengths
            self.position = 0
            return
        rt = self.runtime
        joined: dict[str, Feed] = {}
        for name, mine in self.cache.items():
            a, b = host(mine), host(other.cache[name])
            axis = 1 if a.ndim == 2 else 2  # the encoder mask (R, S); K/V (R, H, S or T, Dh)
            shape = list(a.shape)
            shape[0], shape[axis] = a.shape[0] + b.shape[0], max(a.shape[axis], b.shape[axis])
            both = np.zeros(shape, dtype=a.dtype)  # padding: zeros / False, masked by lengths and the mask
            both[tuple(slice(0, n) for n in a.shape)] = a
            both[(slice(a.shape[0], None),) + tuple(slice(0, n) for n in b.shape[1:])] = b
            joined[name] = both if both.size == 0 else rt.to_device(both)  # an empty past binds as is
        self.cache, self.rows = joined, self.rows + other.rows
        self.lengths = np.concatenate([self.lengths, other.lengths])

    def trim(self) -> int:
        """Drop the leading past slots that no row uses any more (its oldest rows left); returns how many."""
        unused = int(self.position - self.lengths.max()) if self.rows else self.position
        if unused < max(8, self.position // 4):  # a copy of the past: worth it only for a real saving
            return 0
        for _, past in self.self_pairs:
            self.cache[past] = self.runtime.to_device(host(self.cache[past])[:, :, unused:, :])
        self.position -= unused
        return unused


def return_freed_memory() -> None:
    """Ask glibc to give freed heap back to the OS: a released session's weights and arena otherwise
    stay in the process as free heap (measured: RSS grew by a model's size at every reload). A no-op
    where there is no glibc."""
    gc.collect()  # versions still reachable only through reference cycles go first
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def host(value: Feed) -> np.ndarray:
    return value.numpy() if isinstance(value, ort.OrtValue) else value

