from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Empty(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HostInfo(_message.Message):
    __slots__ = ("protocol_version", "name", "criu_version", "phaul_version", "address", "bridge", "memory_available", "memory_committed", "containers")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CRIU_VERSION_FIELD_NUMBER: _ClassVar[int]
    PHAUL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    BRIDGE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_COMMITTED_FIELD_NUMBER: _ClassVar[int]
    CONTAINERS_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    name: str
    criu_version: str
    phaul_version: str
    address: str
    bridge: str
    memory_available: int
    memory_committed: int
    containers: int
    def __init__(self, protocol_version: _Optional[int] = ..., name: _Optional[str] = ..., criu_version: _Optional[str] = ..., phaul_version: _Optional[str] = ..., address: _Optional[str] = ..., bridge: _Optional[str] = ..., memory_available: _Optional[int] = ..., memory_committed: _Optional[int] = ..., containers: _Optional[int] = ...) -> None: ...

class ContainerConfig(_message.Message):
    __slots__ = ("id", "template", "memory", "cpus", "pids", "ip", "gateway", "mac", "args", "cap_add", "seccomp", "packages", "init", "rootfs", "image", "env", "uid", "gid", "groups", "cwd", "image_ref")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    CPUS_FIELD_NUMBER: _ClassVar[int]
    PIDS_FIELD_NUMBER: _ClassVar[int]
    IP_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    CAP_ADD_FIELD_NUMBER: _ClassVar[int]
    SECCOMP_FIELD_NUMBER: _ClassVar[int]
    PACKAGES_FIELD_NUMBER: _ClassVar[int]
    INIT_FIELD_NUMBER: _ClassVar[int]
    ROOTFS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    GID_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    CWD_FIELD_NUMBER: _ClassVar[int]
    IMAGE_REF_FIELD_NUMBER: _ClassVar[int]
    id: str
    template: str
    memory: int
    cpus: float
    pids: int
    ip: str
    gateway: str
    mac: str
    args: _containers.RepeatedScalarFieldContainer[str]
    cap_add: _containers.RepeatedScalarFieldContainer[str]
    seccomp: str
    packages: _containers.RepeatedScalarFieldContainer[str]
    init: str
    rootfs: str
    image: str
    env: _containers.RepeatedScalarFieldContainer[str]
    uid: int
    gid: int
    groups: _containers.RepeatedScalarFieldContainer[int]
    cwd: str
    image_ref: str
    def __init__(self, id: _Optional[str] = ..., template: _Optional[str] = ..., memory: _Optional[int] = ..., cpus: _Optional[float] = ..., pids: _Optional[int] = ..., ip: _Optional[str] = ..., gateway: _Optional[str] = ..., mac: _Optional[str] = ..., args: _Optional[_Iterable[str]] = ..., cap_add: _Optional[_Iterable[str]] = ..., seccomp: _Optional[str] = ..., packages: _Optional[_Iterable[str]] = ..., init: _Optional[str] = ..., rootfs: _Optional[str] = ..., image: _Optional[str] = ..., env: _Optional[_Iterable[str]] = ..., uid: _Optional[int] = ..., gid: _Optional[int] = ..., groups: _Optional[_Iterable[int]] = ..., cwd: _Optional[str] = ..., image_ref: _Optional[str] = ...) -> None: ...

class ContainerRef(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ContainerInfo(_message.Message):
    __slots__ = ("id", "state", "pid", "memory_used", "memory_limit", "ip", "exit_status")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LIMIT_FIELD_NUMBER: _ClassVar[int]
    IP_FIELD_NUMBER: _ClassVar[int]
    EXIT_STATUS_FIELD_NUMBER: _ClassVar[int]
    id: str
    state: str
    pid: int
    memory_used: int
    memory_limit: int
    ip: str
    exit_status: str
    def __init__(self, id: _Optional[str] = ..., state: _Optional[str] = ..., pid: _Optional[int] = ..., memory_used: _Optional[int] = ..., memory_limit: _Optional[int] = ..., ip: _Optional[str] = ..., exit_status: _Optional[str] = ...) -> None: ...

class LogsRequest(_message.Message):
    __slots__ = ("id", "tail", "follow", "file_id", "offset")
    ID_FIELD_NUMBER: _ClassVar[int]
    TAIL_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    FILE_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    id: str
    tail: int
    follow: bool
    file_id: int
    offset: int
    def __init__(self, id: _Optional[str] = ..., tail: _Optional[int] = ..., follow: _Optional[bool] = ..., file_id: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class LogsReply(_message.Message):
    __slots__ = ("data", "file_id", "offset", "state")
    DATA_FIELD_NUMBER: _ClassVar[int]
    FILE_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    file_id: int
    offset: int
    state: str
    def __init__(self, data: _Optional[bytes] = ..., file_id: _Optional[int] = ..., offset: _Optional[int] = ..., state: _Optional[str] = ...) -> None: ...

class ContainerList(_message.Message):
    __slots__ = ("containers",)
    CONTAINERS_FIELD_NUMBER: _ClassVar[int]
    containers: _containers.RepeatedCompositeFieldContainer[ContainerInfo]
    def __init__(self, containers: _Optional[_Iterable[_Union[ContainerInfo, _Mapping]]] = ...) -> None: ...

class StartRequest(_message.Message):
    __slots__ = ("id", "args")
    ID_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    id: str
    args: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., args: _Optional[_Iterable[str]] = ...) -> None: ...

class ExecRequest(_message.Message):
    __slots__ = ("id", "args", "timeout")
    ID_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    id: str
    args: _containers.RepeatedScalarFieldContainer[str]
    timeout: float
    def __init__(self, id: _Optional[str] = ..., args: _Optional[_Iterable[str]] = ..., timeout: _Optional[float] = ...) -> None: ...

class ExecReply(_message.Message):
    __slots__ = ("returncode", "stdout", "stderr")
    RETURNCODE_FIELD_NUMBER: _ClassVar[int]
    STDOUT_FIELD_NUMBER: _ClassVar[int]
    STDERR_FIELD_NUMBER: _ClassVar[int]
    returncode: int
    stdout: bytes
    stderr: bytes
    def __init__(self, returncode: _Optional[int] = ..., stdout: _Optional[bytes] = ..., stderr: _Optional[bytes] = ...) -> None: ...

class MigrateRequest(_message.Message):
    __slots__ = ("ct_id", "dest_name", "dest_address", "tcp_close", "method", "max_rounds", "max_downtime_ms", "bandwidth", "force", "offline", "copy_as", "copy_ip")
    CT_ID_FIELD_NUMBER: _ClassVar[int]
    DEST_NAME_FIELD_NUMBER: _ClassVar[int]
    DEST_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TCP_CLOSE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    MAX_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    MAX_DOWNTIME_MS_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    OFFLINE_FIELD_NUMBER: _ClassVar[int]
    COPY_AS_FIELD_NUMBER: _ClassVar[int]
    COPY_IP_FIELD_NUMBER: _ClassVar[int]
    ct_id: str
    dest_name: str
    dest_address: str
    tcp_close: bool
    method: str
    max_rounds: int
    max_downtime_ms: int
    bandwidth: int
    force: _containers.RepeatedScalarFieldContainer[str]
    offline: bool
    copy_as: str
    copy_ip: str
    def __init__(self, ct_id: _Optional[str] = ..., dest_name: _Optional[str] = ..., dest_address: _Optional[str] = ..., tcp_close: _Optional[bool] = ..., method: _Optional[str] = ..., max_rounds: _Optional[int] = ..., max_downtime_ms: _Optional[int] = ..., bandwidth: _Optional[int] = ..., force: _Optional[_Iterable[str]] = ..., offline: _Optional[bool] = ..., copy_as: _Optional[str] = ..., copy_ip: _Optional[str] = ...) -> None: ...

class Round(_message.Message):
    __slots__ = ("pages_dumped", "pages_sent", "bytes_sent", "frozen_ms", "duration_ms", "fs_bytes_sent", "predicted_frozen_ms", "dirty_rate")
    PAGES_DUMPED_FIELD_NUMBER: _ClassVar[int]
    PAGES_SENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    FROZEN_MS_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    FS_BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_FROZEN_MS_FIELD_NUMBER: _ClassVar[int]
    DIRTY_RATE_FIELD_NUMBER: _ClassVar[int]
    pages_dumped: int
    pages_sent: int
    bytes_sent: int
    frozen_ms: float
    duration_ms: float
    fs_bytes_sent: int
    predicted_frozen_ms: float
    dirty_rate: float
    def __init__(self, pages_dumped: _Optional[int] = ..., pages_sent: _Optional[int] = ..., bytes_sent: _Optional[int] = ..., frozen_ms: _Optional[float] = ..., duration_ms: _Optional[float] = ..., fs_bytes_sent: _Optional[int] = ..., predicted_frozen_ms: _Optional[float] = ..., dirty_rate: _Optional[float] = ...) -> None: ...

class FinishReply(_message.Message):
    __slots__ = ("postcopy_bytes",)
    POSTCOPY_BYTES_FIELD_NUMBER: _ClassVar[int]
    postcopy_bytes: int
    def __init__(self, postcopy_bytes: _Optional[int] = ...) -> None: ...

class Report(_message.Message):
    __slots__ = ("migration_id", "result", "ct", "source", "destination", "memory_method", "rounds", "frozen_ms", "total_ms", "bytes_sent", "fs_bytes_sent", "criu_ms", "error", "stop_reason", "started_at", "method_reason", "postcopy_ms", "postcopy_bytes", "phases_ms", "aborted_by")
    class CriuMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class PhasesMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    CT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    MEMORY_METHOD_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    FROZEN_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    FS_BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    CRIU_MS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    METHOD_REASON_FIELD_NUMBER: _ClassVar[int]
    POSTCOPY_MS_FIELD_NUMBER: _ClassVar[int]
    POSTCOPY_BYTES_FIELD_NUMBER: _ClassVar[int]
    PHASES_MS_FIELD_NUMBER: _ClassVar[int]
    ABORTED_BY_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    result: str
    ct: str
    source: str
    destination: str
    memory_method: str
    rounds: _containers.RepeatedCompositeFieldContainer[Round]
    frozen_ms: float
    total_ms: float
    bytes_sent: int
    fs_bytes_sent: int
    criu_ms: _containers.ScalarMap[str, float]
    error: str
    stop_reason: str
    started_at: str
    method_reason: str
    postcopy_ms: float
    postcopy_bytes: int
    phases_ms: _containers.ScalarMap[str, float]
    aborted_by: str
    def __init__(self, migration_id: _Optional[str] = ..., result: _Optional[str] = ..., ct: _Optional[str] = ..., source: _Optional[str] = ..., destination: _Optional[str] = ..., memory_method: _Optional[str] = ..., rounds: _Optional[_Iterable[_Union[Round, _Mapping]]] = ..., frozen_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., bytes_sent: _Optional[int] = ..., fs_bytes_sent: _Optional[int] = ..., criu_ms: _Optional[_Mapping[str, float]] = ..., error: _Optional[str] = ..., stop_reason: _Optional[str] = ..., started_at: _Optional[str] = ..., method_reason: _Optional[str] = ..., postcopy_ms: _Optional[float] = ..., postcopy_bytes: _Optional[int] = ..., phases_ms: _Optional[_Mapping[str, float]] = ..., aborted_by: _Optional[str] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("phase", "round", "bytes_sent", "rate", "dirty_rate", "predicted_frozen_ms", "message")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    RATE_FIELD_NUMBER: _ClassVar[int]
    DIRTY_RATE_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_FROZEN_MS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    phase: str
    round: int
    bytes_sent: int
    rate: float
    dirty_rate: float
    predicted_frozen_ms: float
    message: str
    def __init__(self, phase: _Optional[str] = ..., round: _Optional[int] = ..., bytes_sent: _Optional[int] = ..., rate: _Optional[float] = ..., dirty_rate: _Optional[float] = ..., predicted_frozen_ms: _Optional[float] = ..., message: _Optional[str] = ...) -> None: ...

class Started(_message.Message):
    __slots__ = ("migration_id",)
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    def __init__(self, migration_id: _Optional[str] = ...) -> None: ...

class MigrateEvent(_message.Message):
    __slots__ = ("progress", "report", "started")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    progress: Progress
    report: Report
    started: Started
    def __init__(self, progress: _Optional[_Union[Progress, _Mapping]] = ..., report: _Optional[_Union[Report, _Mapping]] = ..., started: _Optional[_Union[Started, _Mapping]] = ...) -> None: ...

class PrepareRequest(_message.Message):
    __slots__ = ("migration_id", "source_name", "config", "criu_version", "need_bytes", "tcp_close", "source_address", "page_link", "offline", "start", "standby", "standby_base")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_NAME_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    CRIU_VERSION_FIELD_NUMBER: _ClassVar[int]
    NEED_BYTES_FIELD_NUMBER: _ClassVar[int]
    TCP_CLOSE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PAGE_LINK_FIELD_NUMBER: _ClassVar[int]
    OFFLINE_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    STANDBY_FIELD_NUMBER: _ClassVar[int]
    STANDBY_BASE_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    source_name: str
    config: ContainerConfig
    criu_version: str
    need_bytes: int
    tcp_close: bool
    source_address: str
    page_link: str
    offline: bool
    start: bool
    standby: bool
    standby_base: str
    def __init__(self, migration_id: _Optional[str] = ..., source_name: _Optional[str] = ..., config: _Optional[_Union[ContainerConfig, _Mapping]] = ..., criu_version: _Optional[str] = ..., need_bytes: _Optional[int] = ..., tcp_close: _Optional[bool] = ..., source_address: _Optional[str] = ..., page_link: _Optional[str] = ..., offline: _Optional[bool] = ..., start: _Optional[bool] = ..., standby: _Optional[bool] = ..., standby_base: _Optional[str] = ...) -> None: ...

class PrepareReply(_message.Message):
    __slots__ = ("data_address", "criu_version", "secret", "standby_base")
    DATA_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CRIU_VERSION_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    STANDBY_BASE_FIELD_NUMBER: _ClassVar[int]
    data_address: str
    criu_version: str
    secret: str
    standby_base: str
    def __init__(self, data_address: _Optional[str] = ..., criu_version: _Optional[str] = ..., secret: _Optional[str] = ..., standby_base: _Optional[str] = ...) -> None: ...

class MigrationRef(_message.Message):
    __slots__ = ("migration_id",)
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    def __init__(self, migration_id: _Optional[str] = ...) -> None: ...

class RestoreReply(_message.Message):
    __slots__ = ("criu_ms", "restore_ms")
    class CriuMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    CRIU_MS_FIELD_NUMBER: _ClassVar[int]
    RESTORE_MS_FIELD_NUMBER: _ClassVar[int]
    criu_ms: _containers.ScalarMap[str, float]
    restore_ms: float
    def __init__(self, criu_ms: _Optional[_Mapping[str, float]] = ..., restore_ms: _Optional[float] = ...) -> None: ...

class ApplyPagesRequest(_message.Message):
    __slots__ = ("migration_id",)
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    def __init__(self, migration_id: _Optional[str] = ...) -> None: ...

class ApplyPagesReply(_message.Message):
    __slots__ = ("pages_written", "apply_ms")
    PAGES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    APPLY_MS_FIELD_NUMBER: _ClassVar[int]
    pages_written: int
    apply_ms: float
    def __init__(self, pages_written: _Optional[int] = ..., apply_ms: _Optional[float] = ...) -> None: ...

class PageStreamReply(_message.Message):
    __slots__ = ("address",)
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    address: str
    def __init__(self, address: _Optional[str] = ...) -> None: ...

class MigrationState(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: str
    def __init__(self, state: _Optional[str] = ...) -> None: ...

class Decision(_message.Message):
    __slots__ = ("decision", "message")
    DECISION_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    decision: str
    message: str
    def __init__(self, decision: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class MigrationRecord(_message.Message):
    __slots__ = ("migration_id", "role", "ct", "peer", "state", "step", "started_at", "updated_at", "error", "steps")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CT_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    role: str
    ct: str
    peer: str
    state: str
    step: str
    started_at: str
    updated_at: str
    error: str
    steps: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, migration_id: _Optional[str] = ..., role: _Optional[str] = ..., ct: _Optional[str] = ..., peer: _Optional[str] = ..., state: _Optional[str] = ..., step: _Optional[str] = ..., started_at: _Optional[str] = ..., updated_at: _Optional[str] = ..., error: _Optional[str] = ..., steps: _Optional[_Iterable[str]] = ...) -> None: ...

class MigrationList(_message.Message):
    __slots__ = ("migrations",)
    MIGRATIONS_FIELD_NUMBER: _ClassVar[int]
    migrations: _containers.RepeatedCompositeFieldContainer[MigrationRecord]
    def __init__(self, migrations: _Optional[_Iterable[_Union[MigrationRecord, _Mapping]]] = ...) -> None: ...

class RecoverRequest(_message.Message):
    __slots__ = ("migration_id",)
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    def __init__(self, migration_id: _Optional[str] = ...) -> None: ...

class RecoverOutcome(_message.Message):
    __slots__ = ("migration_id", "role", "result", "message")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    role: str
    result: str
    message: str
    def __init__(self, migration_id: _Optional[str] = ..., role: _Optional[str] = ..., result: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class RecoverReply(_message.Message):
    __slots__ = ("outcomes",)
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    outcomes: _containers.RepeatedCompositeFieldContainer[RecoverOutcome]
    def __init__(self, outcomes: _Optional[_Iterable[_Union[RecoverOutcome, _Mapping]]] = ...) -> None: ...

class CheckRequest(_message.Message):
    __slots__ = ("ct_id", "dest_name", "dest_address")
    CT_ID_FIELD_NUMBER: _ClassVar[int]
    DEST_NAME_FIELD_NUMBER: _ClassVar[int]
    DEST_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ct_id: str
    dest_name: str
    dest_address: str
    def __init__(self, ct_id: _Optional[str] = ..., dest_name: _Optional[str] = ..., dest_address: _Optional[str] = ...) -> None: ...

class PeerCheckRequest(_message.Message):
    __slots__ = ("source_name", "config", "criu_version", "need_memory", "need_disk", "cpuinfo")
    SOURCE_NAME_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    CRIU_VERSION_FIELD_NUMBER: _ClassVar[int]
    NEED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    NEED_DISK_FIELD_NUMBER: _ClassVar[int]
    CPUINFO_FIELD_NUMBER: _ClassVar[int]
    source_name: str
    config: ContainerConfig
    criu_version: str
    need_memory: int
    need_disk: int
    cpuinfo: bytes
    def __init__(self, source_name: _Optional[str] = ..., config: _Optional[_Union[ContainerConfig, _Mapping]] = ..., criu_version: _Optional[str] = ..., need_memory: _Optional[int] = ..., need_disk: _Optional[int] = ..., cpuinfo: _Optional[bytes] = ...) -> None: ...

class CheckResult(_message.Message):
    __slots__ = ("name", "status", "message", "host")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    name: str
    status: str
    message: str
    host: str
    def __init__(self, name: _Optional[str] = ..., status: _Optional[str] = ..., message: _Optional[str] = ..., host: _Optional[str] = ...) -> None: ...

class CheckReply(_message.Message):
    __slots__ = ("checks", "transfer_ms", "restore_ms")
    CHECKS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_MS_FIELD_NUMBER: _ClassVar[int]
    RESTORE_MS_FIELD_NUMBER: _ClassVar[int]
    checks: _containers.RepeatedCompositeFieldContainer[CheckResult]
    transfer_ms: float
    restore_ms: float
    def __init__(self, checks: _Optional[_Iterable[_Union[CheckResult, _Mapping]]] = ..., transfer_ms: _Optional[float] = ..., restore_ms: _Optional[float] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("migration_id", "ct")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    CT_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    ct: str
    def __init__(self, migration_id: _Optional[str] = ..., ct: _Optional[str] = ...) -> None: ...

class AbortReply(_message.Message):
    __slots__ = ("migration_id", "ct", "destination", "step")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    CT_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    ct: str
    destination: str
    step: str
    def __init__(self, migration_id: _Optional[str] = ..., ct: _Optional[str] = ..., destination: _Optional[str] = ..., step: _Optional[str] = ...) -> None: ...

class FollowRequest(_message.Message):
    __slots__ = ("migration_id",)
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    def __init__(self, migration_id: _Optional[str] = ...) -> None: ...

class FollowEvent(_message.Message):
    __slots__ = ("migration_id", "ct", "source", "destination", "progress", "total_bytes", "report")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    CT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    ct: str
    source: str
    destination: str
    progress: Progress
    total_bytes: int
    report: Report
    def __init__(self, migration_id: _Optional[str] = ..., ct: _Optional[str] = ..., source: _Optional[str] = ..., destination: _Optional[str] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., total_bytes: _Optional[int] = ..., report: _Optional[_Union[Report, _Mapping]] = ...) -> None: ...

class SetPeersRequest(_message.Message):
    __slots__ = ("peers", "revoked_serials")
    PEERS_FIELD_NUMBER: _ClassVar[int]
    REVOKED_SERIALS_FIELD_NUMBER: _ClassVar[int]
    peers: _containers.RepeatedScalarFieldContainer[str]
    revoked_serials: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, peers: _Optional[_Iterable[str]] = ..., revoked_serials: _Optional[_Iterable[str]] = ...) -> None: ...

class SetPeersReply(_message.Message):
    __slots__ = ("peers", "revoked_added", "revoked_list")
    PEERS_FIELD_NUMBER: _ClassVar[int]
    REVOKED_ADDED_FIELD_NUMBER: _ClassVar[int]
    REVOKED_LIST_FIELD_NUMBER: _ClassVar[int]
    peers: _containers.RepeatedScalarFieldContainer[str]
    revoked_added: int
    revoked_list: str
    def __init__(self, peers: _Optional[_Iterable[str]] = ..., revoked_added: _Optional[int] = ..., revoked_list: _Optional[str] = ...) -> None: ...

class StandbyRequest(_message.Message):
    __slots__ = ("ct_id", "host", "host_address", "interval_s", "max_lag_s")
    CT_ID_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    HOST_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    MAX_LAG_S_FIELD_NUMBER: _ClassVar[int]
    ct_id: str
    host: str
    host_address: str
    interval_s: float
    max_lag_s: float
    def __init__(self, ct_id: _Optional[str] = ..., host: _Optional[str] = ..., host_address: _Optional[str] = ..., interval_s: _Optional[float] = ..., max_lag_s: _Optional[float] = ...) -> None: ...

class StandbyInfo(_message.Message):
    __slots__ = ("ct", "role", "primary", "standby", "interval_s", "max_lag_s", "checkpoint_at", "refresh_bytes", "pause_ms", "refreshes", "error", "state")
    CT_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_FIELD_NUMBER: _ClassVar[int]
    STANDBY_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    MAX_LAG_S_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_AT_FIELD_NUMBER: _ClassVar[int]
    REFRESH_BYTES_FIELD_NUMBER: _ClassVar[int]
    PAUSE_MS_FIELD_NUMBER: _ClassVar[int]
    REFRESHES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ct: str
    role: str
    primary: str
    standby: str
    interval_s: float
    max_lag_s: float
    checkpoint_at: float
    refresh_bytes: int
    pause_ms: float
    refreshes: int
    error: str
    state: str
    def __init__(self, ct: _Optional[str] = ..., role: _Optional[str] = ..., primary: _Optional[str] = ..., standby: _Optional[str] = ..., interval_s: _Optional[float] = ..., max_lag_s: _Optional[float] = ..., checkpoint_at: _Optional[float] = ..., refresh_bytes: _Optional[int] = ..., pause_ms: _Optional[float] = ..., refreshes: _Optional[int] = ..., error: _Optional[str] = ..., state: _Optional[str] = ...) -> None: ...

class StandbyListReply(_message.Message):
    __slots__ = ("standbys",)
    STANDBYS_FIELD_NUMBER: _ClassVar[int]
    standbys: _containers.RepeatedCompositeFieldContainer[StandbyInfo]
    def __init__(self, standbys: _Optional[_Iterable[_Union[StandbyInfo, _Mapping]]] = ...) -> None: ...

class KeepStandbyReply(_message.Message):
    __slots__ = ("checkpoint_at",)
    CHECKPOINT_AT_FIELD_NUMBER: _ClassVar[int]
    checkpoint_at: float
    def __init__(self, checkpoint_at: _Optional[float] = ...) -> None: ...

class FailoverRequest(_message.Message):
    __slots__ = ("ct_id", "fenced")
    CT_ID_FIELD_NUMBER: _ClassVar[int]
    FENCED_FIELD_NUMBER: _ClassVar[int]
    ct_id: str
    fenced: bool
    def __init__(self, ct_id: _Optional[str] = ..., fenced: _Optional[bool] = ...) -> None: ...

class FailoverReply(_message.Message):
    __slots__ = ("ct", "primary", "checkpoint_at", "restore_ms", "fence")
    CT_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_AT_FIELD_NUMBER: _ClassVar[int]
    RESTORE_MS_FIELD_NUMBER: _ClassVar[int]
    FENCE_FIELD_NUMBER: _ClassVar[int]
    ct: str
    primary: str
    checkpoint_at: float
    restore_ms: float
    fence: str
    def __init__(self, ct: _Optional[str] = ..., primary: _Optional[str] = ..., checkpoint_at: _Optional[float] = ..., restore_ms: _Optional[float] = ..., fence: _Optional[str] = ...) -> None: ...

class FenceReply(_message.Message):
    __slots__ = ("running",)
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    running: bool
    def __init__(self, running: _Optional[bool] = ...) -> None: ...
