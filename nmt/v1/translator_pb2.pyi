from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DecodingOptions(_message.Message):
    __slots__ = ("beam_size", "length_penalty", "n_best", "max_length_a", "max_length_b", "min_length", "return_scores", "return_alignments")
    BEAM_SIZE_FIELD_NUMBER: _ClassVar[int]
    LENGTH_PENALTY_FIELD_NUMBER: _ClassVar[int]
    N_BEST_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_A_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_B_FIELD_NUMBER: _ClassVar[int]
    MIN_LENGTH_FIELD_NUMBER: _ClassVar[int]
    RETURN_SCORES_FIELD_NUMBER: _ClassVar[int]
    RETURN_ALIGNMENTS_FIELD_NUMBER: _ClassVar[int]
    beam_size: int
    length_penalty: float
    n_best: int
    max_length_a: float
    max_length_b: int
    min_length: int
    return_scores: bool
    return_alignments: bool
    def __init__(self, beam_size: _Optional[int] = ..., length_penalty: _Optional[float] = ..., n_best: _Optional[int] = ..., max_length_a: _Optional[float] = ..., max_length_b: _Optional[int] = ..., min_length: _Optional[int] = ..., return_scores: _Optional[bool] = ..., return_alignments: _Optional[bool] = ...) -> None: ...

class TranslateRequest(_message.Message):
    __slots__ = ("request_id", "texts", "options", "model", "source_language", "target_language", "text_options", "keep_terms")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SOURCE_LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    TARGET_LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    TEXT_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    KEEP_TERMS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    texts: _containers.RepeatedScalarFieldContainer[str]
    options: DecodingOptions
    model: str
    source_language: str
    target_language: str
    text_options: _containers.RepeatedCompositeFieldContainer[TextOptions]
    keep_terms: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, request_id: _Optional[str] = ..., texts: _Optional[_Iterable[str]] = ..., options: _Optional[_Union[DecodingOptions, _Mapping]] = ..., model: _Optional[str] = ..., source_language: _Optional[str] = ..., target_language: _Optional[str] = ..., text_options: _Optional[_Iterable[_Union[TextOptions, _Mapping]]] = ..., keep_terms: _Optional[_Iterable[str]] = ...) -> None: ...

class Span(_message.Message):
    __slots__ = ("start", "end")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class TextOptions(_message.Message):
    __slots__ = ("target_prefix", "target_prefix_tokens", "protected_spans")
    TARGET_PREFIX_FIELD_NUMBER: _ClassVar[int]
    TARGET_PREFIX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROTECTED_SPANS_FIELD_NUMBER: _ClassVar[int]
    target_prefix: str
    target_prefix_tokens: _containers.RepeatedScalarFieldContainer[int]
    protected_spans: _containers.RepeatedCompositeFieldContainer[Span]
    def __init__(self, target_prefix: _Optional[str] = ..., target_prefix_tokens: _Optional[_Iterable[int]] = ..., protected_spans: _Optional[_Iterable[_Union[Span, _Mapping]]] = ...) -> None: ...

class TranslateIncrementalRequest(_message.Message):
    __slots__ = ("request_id", "text", "options", "model", "source_language", "target_language", "text_options", "keep_terms", "interval")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SOURCE_LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    TARGET_LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    TEXT_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    KEEP_TERMS_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    text: str
    options: DecodingOptions
    model: str
    source_language: str
    target_language: str
    text_options: TextOptions
    keep_terms: _containers.RepeatedScalarFieldContainer[str]
    interval: int
    def __init__(self, request_id: _Optional[str] = ..., text: _Optional[str] = ..., options: _Optional[_Union[DecodingOptions, _Mapping]] = ..., model: _Optional[str] = ..., source_language: _Optional[str] = ..., target_language: _Optional[str] = ..., text_options: _Optional[_Union[TextOptions, _Mapping]] = ..., keep_terms: _Optional[_Iterable[str]] = ..., interval: _Optional[int] = ...) -> None: ...

class TranslateIncrementalResponse(_message.Message):
    __slots__ = ("request_id", "piece", "partial", "step", "final", "translation", "model", "model_version")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PIECE_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    TRANSLATION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    piece: str
    partial: str
    step: int
    final: bool
    translation: Translation
    model: str
    model_version: str
    def __init__(self, request_id: _Optional[str] = ..., piece: _Optional[str] = ..., partial: _Optional[str] = ..., step: _Optional[int] = ..., final: _Optional[bool] = ..., translation: _Optional[_Union[Translation, _Mapping]] = ..., model: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class Hypothesis(_message.Message):
    __slots__ = ("text", "tokens", "score", "log_prob", "alignment")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    LOG_PROB_FIELD_NUMBER: _ClassVar[int]
    ALIGNMENT_FIELD_NUMBER: _ClassVar[int]
    text: str
    tokens: _containers.RepeatedScalarFieldContainer[int]
    score: float
    log_prob: float
    alignment: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, text: _Optional[str] = ..., tokens: _Optional[_Iterable[int]] = ..., score: _Optional[float] = ..., log_prob: _Optional[float] = ..., alignment: _Optional[_Iterable[int]] = ...) -> None: ...

class Translation(_message.Message):
    __slots__ = ("text", "hypotheses", "source_tokens")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    HYPOTHESES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    text: str
    hypotheses: _containers.RepeatedCompositeFieldContainer[Hypothesis]
    source_tokens: int
    def __init__(self, text: _Optional[str] = ..., hypotheses: _Optional[_Iterable[_Union[Hypothesis, _Mapping]]] = ..., source_tokens: _Optional[int] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class TranslateResponse(_message.Message):
    __slots__ = ("request_id", "translations", "model", "error", "model_version")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSLATIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    translations: _containers.RepeatedCompositeFieldContainer[Translation]
    model: str
    error: Error
    model_version: str
    def __init__(self, request_id: _Optional[str] = ..., translations: _Optional[_Iterable[_Union[Translation, _Mapping]]] = ..., model: _Optional[str] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., model_version: _Optional[str] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "source_language", "target_language", "d_model", "n_heads", "n_encoder_layers", "n_decoder_layers", "vocab_size", "max_source_tokens", "dtype", "provider", "is_default", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    TARGET_LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    D_MODEL_FIELD_NUMBER: _ClassVar[int]
    N_HEADS_FIELD_NUMBER: _ClassVar[int]
    N_ENCODER_LAYERS_FIELD_NUMBER: _ClassVar[int]
    N_DECODER_LAYERS_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_SOURCE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    source_language: str
    target_language: str
    d_model: int
    n_heads: int
    n_encoder_layers: int
    n_decoder_layers: int
    vocab_size: int
    max_source_tokens: int
    dtype: str
    provider: str
    is_default: bool
    version: str
    def __init__(self, name: _Optional[str] = ..., source_language: _Optional[str] = ..., target_language: _Optional[str] = ..., d_model: _Optional[int] = ..., n_heads: _Optional[int] = ..., n_encoder_layers: _Optional[int] = ..., n_decoder_layers: _Optional[int] = ..., vocab_size: _Optional[int] = ..., max_source_tokens: _Optional[int] = ..., dtype: _Optional[str] = ..., provider: _Optional[str] = ..., is_default: _Optional[bool] = ..., version: _Optional[str] = ...) -> None: ...

class LanguagePair(_message.Message):
    __slots__ = ("source_language", "target_language", "model")
    SOURCE_LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    TARGET_LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    source_language: str
    target_language: str
    model: str
    def __init__(self, source_language: _Optional[str] = ..., target_language: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_texts", "max_chars", "max_message_bytes")
    MAX_TEXTS_FIELD_NUMBER: _ClassVar[int]
    MAX_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    max_texts: int
    max_chars: int
    max_message_bytes: int
    def __init__(self, max_texts: _Optional[int] = ..., max_chars: _Optional[int] = ..., max_message_bytes: _Optional[int] = ...) -> None: ...

class GetModelInfoResponse(_message.Message):
    __slots__ = ("models", "language_pairs", "limits")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_PAIRS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    language_pairs: _containers.RepeatedCompositeFieldContainer[LanguagePair]
    limits: Limits
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., language_pairs: _Optional[_Iterable[_Union[LanguagePair, _Mapping]]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ...) -> None: ...

class ReloadModelRequest(_message.Message):
    __slots__ = ("name", "path")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    name: str
    path: str
    def __init__(self, name: _Optional[str] = ..., path: _Optional[str] = ...) -> None: ...

class ReloadModelResponse(_message.Message):
    __slots__ = ("name", "previous_version", "version", "reloaded")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RELOADED_FIELD_NUMBER: _ClassVar[int]
    name: str
    previous_version: str
    version: str
    reloaded: bool
    def __init__(self, name: _Optional[str] = ..., previous_version: _Optional[str] = ..., version: _Optional[str] = ..., reloaded: _Optional[bool] = ...) -> None: ...
