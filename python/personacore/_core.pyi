"""Typed contract of the native module ``personacore._core`` (rust/personacore-py).

The binding only converts: the request dicts below are read into typed Rust structs, every value is
checked by the engine, and each engine error is raised as its ``personacore.errors`` class
(``InvalidInputError`` for bad values and for arguments of the wrong type).
"""

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, TypedDict, Union

import numpy as np
import numpy.typing as npt

_F32 = npt.NDArray[np.float32]
_Path = Union[str, "os.PathLike[str]"]

class WhenRequest(TypedDict):
    """``pc.When``: on while ``monitor`` scores above/below a threshold (exactly one given)."""

    monitor: str
    above: Optional[float]
    below: Optional[float]
    hysteresis: float
    layer: Optional[int]
    min_on: int  # >= 0 tokens
    min_off: int  # >= 0 tokens
    mode: str  # "switch" | "proportional"
    gain: Optional[float]  # proportional only; None: the engine's default

class InterventionRequest(TypedDict):
    """``pc.Steer`` (kind ``"add"``, ``coef``), ``pc.Ablate`` (``"ablate"``), ``pc.Cap`` (``"cap"``, ``min``/``max``)."""

    kind: str
    name: str
    coef: Optional[float]
    min: Optional[float]
    max: Optional[float]
    vector: _F32  # [hidden] or [num_layers + 1, hidden]
    recommended: Optional[int]
    layers: Optional[List[int]]  # None: the recommended layer
    positions: str  # "all" | "prompt" | "response"
    when: Optional[WhenRequest]
    sequences: Optional[List[int]]  # batch members it applies to; None: all

class MonitorVectorRequest(TypedDict):
    """One named vector of a monitor."""

    name: str
    vector: _F32
    recommended: Optional[int]

_Layers = Union[None, str, List[int]]  # None: recommended; "all"; these layers

class MonitorRequest(TypedDict):
    """``pc.Monitor``: vectors in score order, layers (default and per name), thresholds per name."""

    vectors: List[MonitorVectorRequest]
    layers: _Layers
    layers_by_name: List[Tuple[str, _Layers]]
    thresholds: List[Tuple[str, float]]
    include_sinks: bool  # attention-sink positions raise alerts and switch conditions

class GenerateParams(TypedDict):
    """Generation settings."""

    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: List[str]
    ignore_eos: bool

class EventDict(TypedDict):
    """A monitor or conditional-steer event."""

    kind: str  # "alert" | "clear" | "steer_on" | "steer_off"
    sequence: int
    position: int
    step: int
    vector: str
    layer: int
    score: float
    threshold: Optional[float]
    coef: Optional[float]
    steer: Optional[str]

class StepDict(TypedDict):
    """What one step produced for one sequence."""

    token: Optional[int]
    text: str
    finish_reason: Optional[str]
    scores: Dict[str, _F32]  # {name: [n_positions, n_layers]}
    sinks: List[bool]  # per position of scores: an attention sink
    events: List[EventDict]

class ResultDict(TypedDict):
    """A sequence's result so far."""

    token_ids: List[int]
    text: str
    finish_reason: Optional[str]
    prompt_len: int
    scores: Dict[str, _F32]  # {name: [prompt_len + n_generated, n_layers]}
    sinks: List[bool]  # per score row: an attention sink
    events: List[EventDict]

def load_model(
    path: _Path,
    dtype: str = "f32",
    quantized: bool = False,
    device: str = "cpu",
    precision: str = "highest",
    chat_template: Optional[str] = None,
) -> Model:
    """Loads an HF directory or a GGUF file (dtype aliases: f32/float32/fp32, f16/float16/fp16/half, bf16/bfloat16)."""

def check_intervention(spec: InterventionRequest) -> None:
    """Checks a steer request without a model."""

def resolve_intervention(
    spec: InterventionRequest, num_layers: int, hidden_size: int
) -> Tuple[List[int], _F32]:
    """Checks a steer request against a model's dimensions (no personacore model needed); returns
    the layers and the direction at each, ``[len(layers), hidden_size]``."""

def check_when(when: WhenRequest) -> None:
    """Checks a condition without a model."""

def check_monitor(monitor: MonitorRequest) -> None:
    """Checks a monitor request without a model."""

def avx2_enabled() -> bool:
    """Whether this CPU has AVX2 (detected at run time): candle's vectorised CPU kernels run."""

def amx_available() -> bool:
    """Whether ``precision="high"`` changes anything here (AMX-BF16)."""

def num_threads() -> int:
    """CPU threads the engine computes with."""

def cuda_compiled() -> bool:
    """Whether this build was compiled with CUDA support (the ``cuda`` feature)."""

def cuda_available() -> bool:
    """Whether ``device="cuda"`` works here (a CUDA build, a driver and a GPU)."""

def _error_samples() -> List[BaseException]:
    """One exception per engine error variant, then a caught panic's (for tests)."""

class Tokenizer:
    """The tokenizer of a loaded model."""

    @property
    def vocab_size(self) -> int: ...
    @property
    def eos_token_ids(self) -> List[int]: ...
    @property
    def bos_token_id(self) -> Optional[int]: ...
    def encode(self, text: str, add_special_tokens: bool = False) -> List[int]: ...
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...
    def token_to_id(self, token: str) -> Optional[int]: ...
    def id_to_token(self, id: int) -> Optional[str]: ...
    def token_bytes(self, id: int) -> Optional[bytes]: ...

class Steerings:
    """Steerings checked against a model, for ``Model.hidden_states``/``Model.logits``."""

class PreparedMonitor:
    """A monitor checked and resolved for one model, for any number of generations."""

class GenerationPlan:
    """A generation the engine has checked; ``Model.generate_start`` starts it."""

    @property
    def score_layers(self) -> List[Tuple[str, List[int]]]: ...

class SchedulerConfig(TypedDict):
    max_batch: int
    max_tokens_in_flight: Optional[int]
    prefill_chunk: int

class Scheduler:
    """Continuous batching over one model, stepped by ``personacore.engine.serving.Engine``."""

    def add(self, plan: GenerationPlan, on_alert: str, request_id: str) -> int: ...
    def step(self) -> List[Dict[str, Any]]: ...
    def cancel(self, id: int) -> Optional[Dict[str, Any]]: ...
    @property
    def has_work(self) -> bool: ...
    def positions_needed(self, prompt_len: int, max_new_tokens: int) -> int: ...
    def stats(self) -> Dict[str, int]: ...

class Session:
    """A generation in progress."""

    def step(self) -> Optional[List[StepDict]]: ...
    def run(self) -> None: ...
    @property
    def done(self) -> bool: ...
    @property
    def columns(self) -> List[Tuple[str, int]]: ...
    @property
    def score_layers(self) -> List[Tuple[str, List[int]]]: ...
    def results(self) -> List[ResultDict]: ...

class Model:
    """A loaded model."""

    @property
    def num_layers(self) -> int: ...
    @property
    def hidden_size(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def architecture(self) -> str: ...
    @property
    def max_position_embeddings(self) -> int: ...
    @property
    def precision(self) -> str: ...
    @property
    def quantized(self) -> bool: ...
    @property
    def sha256(self) -> str: ...  # model_sha256 of the files it was loaded from
    @property
    def dtype(self) -> str: ...
    @property
    def device(self) -> str: ...
    @property
    def has_chat_template(self) -> bool: ...
    @property
    def config_json(self) -> str: ...
    @property
    def tokenizer(self) -> Tokenizer: ...
    def chat_text(self, messages: Sequence[object], add_generation_prompt: bool = True) -> str: ...
    def prepare_steering(self, steers: Sequence[InterventionRequest]) -> Steerings: ...
    def hidden_states(self, ids: Sequence[int], steers: Optional[Steerings] = None) -> _F32: ...
    def logits(self, ids: Sequence[int], steers: Optional[Steerings] = None) -> _F32: ...
    def prepare_generation(
        self,
        prompts: Sequence[Sequence[int]],
        params: GenerateParams,
        steers: Sequence[InterventionRequest],
        monitor: Optional[MonitorRequest] = None,
        audit_log: Optional[_Path] = None,
        audit_fsync: Optional[str] = None,  # "request" (default) | "event" | "never"
        prepared_monitor: Optional[PreparedMonitor] = None,  # instead of monitor
    ) -> GenerationPlan: ...
    def prepare_monitor(self, monitor: MonitorRequest) -> PreparedMonitor: ...
    def generate_start(self, plan: GenerationPlan) -> Session: ...
    def scheduler(self, config: SchedulerConfig) -> Scheduler: ...
    def monitor_layers(self, monitor: MonitorRequest) -> List[Tuple[str, List[int]]]: ...
    def pool(
        self,
        sequences: Sequence[Sequence[int]],
        prompt_lens: Sequence[int],
        poolings: Sequence[str],
        batch_size: int = 8,
        layers: Optional[Sequence[int]] = None,
    ) -> Dict[str, _F32]: ...
    def pool_pairs(
        self,
        prompts: Sequence[Sequence[int]],
        responses: Sequence[Sequence[int]],
        poolings: Sequence[str],
        batch_size: int = 8,
        layers: Optional[Sequence[int]] = None,
    ) -> Dict[str, _F32]: ...
    def save_hf(self, out_dir: _Path) -> None: ...
