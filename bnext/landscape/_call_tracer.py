"""Module calls of a forward pass, numbered, for the shared-prefix ICS sweep: serving cached outputs,
stopping at a call, recording outputs, and the first use of every parameter."""
from typing import Any, Callable, Dict, List, Optional

from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map

from ._core import Generators, Model


class StopForward(BaseException):
    """Raised by the call tracer to end a forward pass early (a BaseException, so that a model's
    own ``except Exception`` cannot swallow it)."""


class CallSequenceChanged(Exception):
    """The model's module calls differ from pass to pass: the shared-prefix scheme cannot apply."""


class CacheModified(Exception):
    """A cached output was modified in place after it was cached (e.g. ``out += identity`` on a
    cached BatchNorm output): the sweep restarts serving copies."""


def _tensors(tree) -> List[Tensor]:
    return [t for t in tree_leaves(tree) if isinstance(t, Tensor)]


class CallTracer:
    """Numbers every module call of a forward pass (in the order calls start) and lets later
    passes serve cached outputs of calls, end at a given call, and record outputs.

    A call with index j served from the cache skips its descendants: the counter jumps to the value
    it had when call j completed in the reference pass. Cached outputs are served as they are
    (copying them would cost O(layers^2) activation copies); each entry keeps the version counters
    of its tensors, and serving an entry whose tensors were modified in place since raises
    CacheModified (the caller then restarts with copy_outputs=True). When the forward draws random numbers, the
    generators are set, at every call start (and after every cached call), to the state they had
    at that point of the reference pass, so every pass sees the reference pass's draws."""

    def __init__(self, model: nn.Module, gens: Generators):
        self.mods = list(dict.fromkeys(model.modules()))
        self.gens = gens
        self.reference = True
        self.seq: List[nn.Module] = []   # module of call j
        self.end: List[int] = []         # counter value when call j completed
        self.rng_start: List[Any] = []
        self.rng_end: List[Any] = []
        self.replay_rng = False
        self.passive = False
        self.copy_outputs = False
        self.counter = 0
        self.cache: Dict[int, Any] = {}
        self.stop_at: Optional[int] = None
        self.recorded: Optional[Dict[int, Any]] = None
        self._saved: List[Any] = []

    def __enter__(self):
        for m in self.mods:
            self._saved.append(m.__dict__.get("forward"))
            m.forward = self._wrap(m, m.forward)
        return self

    def __exit__(self, *exc):
        for m, f in zip(self.mods, self._saved):
            if f is None:
                del m.forward
            else:
                m.forward = f

    def start(self, cache=None, stop_at=None, record=False, passive=False):
        """Begins a pass after the reference pass. passive=True: calls run untouched."""
        if self.reference and self.seq:
            self.reference = False
            self.replay_rng = not Generators.equal(self.rng_start[0], self.rng_end[0])
        self.passive = passive
        self.counter = 0
        self.cache = cache if cache is not None else {}
        self.stop_at = stop_at
        self.recorded = {} if record else None

    def first_call(self, module: nn.Module) -> Optional[int]:
        for j, m in enumerate(self.seq):
            if m is module:
                return j
        return None

    def _wrap(self, module: nn.Module, orig: Callable) -> Callable:
        def forward(*args, **kwargs):
            if self.passive:
                return orig(*args, **kwargs)
            j = self.counter
            self.counter += 1
            if self.reference:
                self.seq.append(module)
                self.end.append(-1)
                self.rng_start.append(self.gens.get())
                self.rng_end.append(None)
                out = orig(*args, **kwargs)
                self.end[j] = self.counter
                self.rng_end[j] = self.gens.get()
                return out
            if j >= len(self.seq) or self.seq[j] is not module:
                raise CallSequenceChanged(f"call {j} is not {type(module).__name__} as in the first pass")
            if j in self.cache:
                self.counter = self.end[j]
                if self.replay_rng:
                    self.gens.set(self.rng_end[j])
                out, versions = self.cache[j]
                if self.copy_outputs:
                    return tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, out)
                if [t._version for t in _tensors(out)] != versions:
                    raise CacheModified(f"the cached output of call {j} ({type(module).__name__}) was modified in place")
                return out
            if j == self.stop_at:
                raise StopForward()
            if self.replay_rng:
                self.gens.set(self.rng_start[j])
            out = orig(*args, **kwargs)
            if self.end[j] != self.counter:
                raise CallSequenceChanged(f"call {j} ({type(module).__name__}) made other calls than in the first pass")
            if self.recorded is not None:
                self.recorded[j] = tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, out)
            return out
        return forward

    def recorded_entries(self) -> Dict[int, Any]:
        """The outputs recorded in the pass that just ended, with their tensors' current version
        counters (taken after the pass: in-place ops later in the same pass, like a ReLU(inplace)
        on a BatchNorm output, are part of what the cache holds, as in a plain forward)."""
        return {j: (out, [t._version for t in _tensors(out)]) for j, out in self.recorded.items()}


class FirstUse(TorchFunctionMode):
    """Records, for each watched tensor, the tracer's call counter at the first torch function
    that receives it: a parameter whose first use has counter value <= c is used before call c."""

    def __init__(self, tracer: CallTracer, watched: Dict[int, int]):
        super().__init__()
        self.tracer, self.pending, self.first = tracer, dict(watched), {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.pending:
            for t in tree_leaves((args, kwargs)):
                if isinstance(t, Tensor):
                    i = self.pending.pop(id(t), None)
                    if i is not None:
                        self.first[i] = self.tracer.counter
        return func(*args, **kwargs)


def first_uses(model: nn.Module, st: Model, tracer: CallTracer, seen: Dict[int, int]) -> Dict[int, int]:
    """First use of every parameter (see FirstUse). A parameter no torch function received (used
    by an extension outside torch's dispatch, say) counts as used when its module is first called."""
    out = dict(seen)
    owner = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owner.setdefault(id(p), m)
    for i, p in enumerate(st.params):
        if i not in out and id(p) in owner:
            c = tracer.first_call(owner[id(p)])
            if c is not None:
                out[i] = c + 1
    return out
