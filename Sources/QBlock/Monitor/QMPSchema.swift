import QBlockCore
/// `query-qmp-schema`: QAPI introspection (QEMU's `qapi/introspect.json`) of the commands
/// this monitor has registered and the events it sends, with their argument, return and
/// event data types, enums and builtins, in QEMU's `SchemaInfo` format with opaque type
/// names ("0", "1", …; "0" is the empty object; arrays are "[N]").
///
/// The schema is written once below, one definition per line, and the SchemaInfo list is
/// generated from it, keeping only what the registered commands and the events reach:
///
/// ```
/// command NAME {member: TYPE, optional?: TYPE @feature, …} -> RETURN [@feature…]
/// event NAME {members}
/// object NAME {members}
/// union NAME {base members} tag=MEMBER case=TYPE case=TYPE …   (a flat union; only the cases we accept)
/// enum NAME value value …
/// alternate NAME TYPE | TYPE
/// ```
/// A TYPE is a builtin (`str`, `int`, `bool`, `number`, `null`, `any`; QAPI's sized
/// integers introspect as `int`), `{}` (no members), `[TYPE]`, or a defined NAME. Type names
/// here are for reading only (they name where a type is first used). Unions list the
/// drivers and object types this implementation accepts: `blockdev-add` offers file, raw,
/// qcow2, nbd, null-co, null-aio, copy-on-read, blkdebug and blkverify; `blockdev-create` file and qcow2; `object-add` secret and
/// iothread. `QMPSurface2Tests` checks every registered command has an entry.
enum QMPSchema {
    static let table = #"""
command block-commit {job-id?: str, device: str, base-node?: str, base?: str @deprecated, top-node?: str, top?: str @deprecated, backing-file?: str, speed?: int, on-error?: block-commit.on-error, filter-node-name?: str, auto-finalize?: bool, auto-dismiss?: bool} -> {}
command block-dirty-bitmap-add {node: str, name: str, granularity?: int, persistent?: bool, disabled?: bool} -> {}
command block-dirty-bitmap-clear {node: str, name: str} -> {}
command block-dirty-bitmap-disable {node: str, name: str} -> {}
command block-dirty-bitmap-enable {node: str, name: str} -> {}
command block-dirty-bitmap-merge {node: str, target: str, bitmaps: [block-dirty-bitmap-merge.bitmaps]} -> {}
command block-dirty-bitmap-remove {node: str, name: str} -> {}
command block-export-add block-export-add -> {}
command block-export-del {id: str, mode?: block-export-del.mode} -> {}
command block-job-cancel {device: str, force?: bool} -> {}
command block-job-complete {device: str} -> {}
command block-job-dismiss {id: str} -> {}
command block-job-finalize {id: str} -> {}
command block-job-pause {device: str} -> {}
command block-job-resume {device: str} -> {}
command block-job-set-speed {device: str, speed: int} -> {}
command block-set-write-threshold {node-name: str, write-threshold: int} -> {}
command block-stream {job-id?: str, device: str, base?: str, base-node?: str, backing-file?: str, bottom?: str, speed?: int, on-error?: block-commit.on-error, filter-node-name?: str, auto-finalize?: bool, auto-dismiss?: bool} -> {}
command block_resize {device?: str, node-name?: str, size: int} -> {}
command blockdev-add blockdev-add -> {}
command blockdev-backup {job-id?: str, device: str, sync: blockdev-backup.sync, speed?: int, bitmap?: str, bitmap-mode?: blockdev-backup.bitmap-mode, compress?: bool, on-source-error?: block-commit.on-error, on-target-error?: block-commit.on-error, auto-finalize?: bool, auto-dismiss?: bool, filter-node-name?: str, x-perf?: blockdev-backup.x-perf @unstable, target: str} -> {}
command blockdev-create {job-id: str, options: blockdev-create.options} -> {}
command blockdev-del {node-name: str} -> {}
command blockdev-mirror {job-id?: str, device: str, target: str, replaces?: str, sync: blockdev-backup.sync, speed?: int, granularity?: int, buf-size?: int, on-source-error?: block-commit.on-error, on-target-error?: block-commit.on-error, filter-node-name?: str, copy-mode?: blockdev-mirror.copy-mode, auto-finalize?: bool, auto-dismiss?: bool} -> {}
command blockdev-reopen {options: [blockdev-add]} -> {}
command blockdev-snapshot {node: str, overlay: str} -> {} @allow-write-only-overlay
command blockdev-snapshot-delete-internal-sync {device: str, id?: str, name?: str} -> blockdev-snapshot-delete-internal-sync.ret
command blockdev-snapshot-internal-sync {device: str, name: str} -> {}
command blockdev-snapshot-sync {device?: str, node-name?: str, snapshot-file: str, snapshot-node-name?: str, format?: str, mode?: blockdev-snapshot-sync.mode} -> {}
command change-backing-file {device: str, image-node-name: str, backing-file: str} -> {}
command drive-backup {job-id?: str, device: str, sync: blockdev-backup.sync, speed?: int, bitmap?: str, bitmap-mode?: blockdev-backup.bitmap-mode, compress?: bool, on-source-error?: block-commit.on-error, on-target-error?: block-commit.on-error, auto-finalize?: bool, auto-dismiss?: bool, filter-node-name?: str, x-perf?: blockdev-backup.x-perf @unstable, target: str, format?: str, mode?: blockdev-snapshot-sync.mode} -> {} @deprecated
command drive-mirror {job-id?: str, device: str, target: str, format?: str, node-name?: str, replaces?: str, sync: blockdev-backup.sync, mode?: blockdev-snapshot-sync.mode, speed?: int, granularity?: int, buf-size?: int, on-source-error?: block-commit.on-error, on-target-error?: block-commit.on-error, unmap?: bool, copy-mode?: blockdev-mirror.copy-mode, auto-finalize?: bool, auto-dismiss?: bool} -> {}
command job-cancel {id: str} -> {}
command job-complete {id: str} -> {}
command job-dismiss {id: str} -> {}
command job-finalize {id: str} -> {}
command job-pause {id: str} -> {}
command job-resume {id: str} -> {}
command nbd-server-add {name?: str, description?: str, device: str, writable?: bool, bitmap?: str} -> {} @deprecated
command nbd-server-remove {name: str, mode?: block-export-del.mode} -> {} @deprecated
command nbd-server-start {addr: nbd-server-start.addr, tls-creds?: str, tls-authz?: str, max-connections?: int} -> {}
command nbd-server-stop {} -> {}
command object-add object-add -> {}
command object-del {id: str} -> {}
command qmp_capabilities {enable?: [qmp_capabilities.enable]} -> {}
command query-block {} -> [query-block.ret]
command query-block-exports {} -> [query-block-exports.ret]
command query-block-jobs {} -> [query-block-jobs.ret]
command query-blockstats {query-nodes?: bool} -> [query-blockstats.ret]
command query-commands {} -> [query-commands.ret]
command query-jobs {} -> [query-jobs.ret]
command query-named-block-nodes {flat?: bool} -> [query-named-block-nodes.ret]
command query-qmp-schema {} -> [query-qmp-schema.ret]
command query-version {} -> query-version.ret
command quit {} -> {}
command transaction {actions: [transaction.actions], properties?: transaction.properties} -> {}
command x-blockdev-amend {job-id: str, node-name: str, options: x-blockdev-amend.options, force?: bool} -> {} @unstable
command x-debug-block-dirty-bitmap-sha256 {node: str, name: str} -> x-debug-block-dirty-bitmap-sha256.ret @unstable
command x-debug-query-block-graph {} -> x-debug-query-block-graph.ret @unstable
event BLOCK_EXPORT_DELETED {id: str}
event BLOCK_WRITE_THRESHOLD {node-name: str, amount-exceeded: int, write-threshold: int}
event BLOCK_JOB_CANCELLED {type: BLOCK_JOB_CANCELLED.type, device: str, len: int, offset: int, speed: int}
event BLOCK_JOB_COMPLETED {type: BLOCK_JOB_CANCELLED.type, device: str, len: int, offset: int, speed: int, error?: str}
event BLOCK_JOB_ERROR {device: str, operation: BLOCK_JOB_ERROR.operation, action: BLOCK_JOB_ERROR.action}
event BLOCK_JOB_PENDING {type: BLOCK_JOB_CANCELLED.type, id: str}
event BLOCK_JOB_READY {type: BLOCK_JOB_CANCELLED.type, device: str, len: int, offset: int, speed: int}
event JOB_STATUS_CHANGE {id: str, status: JOB_STATUS_CHANGE.status}
enum block-commit.on-error report ignore enospc stop auto
alternate block-dirty-bitmap-merge.bitmaps str | block-dirty-bitmap-merge.bitmaps2
union block-export-add {type: block-export-add.type, id: str, fixed-iothread?: bool, iothread?: str, node-name: str, writable?: bool, writethrough?: bool} tag=type nbd=block-export-add.nbd vhost-user-blk=block-export-add.vhost-user-blk fuse=block-export-add.fuse vduse-blk=block-export-add.vduse-blk
enum block-export-del.mode safe hard
union blockdev-add {driver: blockdev-add.driver, node-name?: str, discard?: blockdev-add.discard, cache?: blockdev-add.cache, read-only?: bool, auto-read-only?: bool, force-share?: bool, detect-zeroes?: blockdev-add.detect-zeroes} tag=driver blkdebug=blockdev-add.blkdebug blkverify=blockdev-add.blkverify copy-on-read=blockdev-add.copy-on-read file=blockdev-add.file nbd=blockdev-add.nbd null-aio=blockdev-add.null-co null-co=blockdev-add.null-co qcow2=blockdev-add.qcow2 raw=blockdev-add.raw
enum blockdev-backup.sync top full none incremental bitmap
enum blockdev-backup.bitmap-mode on-success never always
object blockdev-backup.x-perf {use-copy-range?: bool, max-workers?: int, max-chunk?: int}
union blockdev-create.options {driver: blockdev-add.driver} tag=driver file=blockdev-create.options.file qcow2=blockdev-create.options.qcow2 copy-on-read={} nbd={} raw={}
enum blockdev-mirror.copy-mode background write-blocking
object blockdev-snapshot-delete-internal-sync.ret {id: str, name: str, vm-state-size: int, date-sec: int, date-nsec: int, vm-clock-sec: int, vm-clock-nsec: int, icount?: int}
enum blockdev-snapshot-sync.mode existing absolute-paths
union nbd-server-start.addr {type: nbd-server-start.addr.type} tag=type inet=nbd-server-start.addr.inet unix=nbd-server-start.addr.unix vsock=nbd-server-start.addr.vsock fd=nbd-server-start.addr.fd
union object-add {qom-type: object-add.qom-type, id: str} tag=qom-type iothread=object-add.iothread secret=object-add.secret
enum qmp_capabilities.enable oob
object query-block.ret {device: str, qdev?: str, type: str, removable: bool, locked: bool, inserted?: query-named-block-nodes.ret, tray_open?: bool, io-status?: query-block.ret.io-status}
object query-block-exports.ret {id: str, type: block-export-add.type, node-name: str, shutting-down: bool}
object query-block-jobs.ret {type: str, device: str, len: int, offset: int, busy: bool, paused: bool, speed: int, io-status: query-block.ret.io-status, ready: bool, status: JOB_STATUS_CHANGE.status, auto-finalize: bool, auto-dismiss: bool, error?: str}
object query-blockstats.ret {device?: str, qdev?: str, node-name?: str, stats: query-blockstats.ret.stats, driver-specific?: query-blockstats.ret.driver-specific, parent?: query-blockstats.ret, backing?: query-blockstats.ret}
object query-commands.ret {name: str}
object query-jobs.ret {id: str, type: BLOCK_JOB_CANCELLED.type, status: JOB_STATUS_CHANGE.status, current-progress: int, total-progress: int, error?: str}
object query-named-block-nodes.ret {file: str, node-name?: str, ro: bool, drv: str, backing_file?: str, backing_file_depth: int, encrypted: bool, detect_zeroes: blockdev-add.detect-zeroes, bps: int, bps_rd: int, bps_wr: int, iops: int, iops_rd: int, iops_wr: int, image: query-named-block-nodes.ret.image, bps_max?: int, bps_rd_max?: int, bps_wr_max?: int, iops_max?: int, iops_rd_max?: int, iops_wr_max?: int, bps_max_length?: int, bps_rd_max_length?: int, bps_wr_max_length?: int, iops_max_length?: int, iops_rd_max_length?: int, iops_wr_max_length?: int, iops_size?: int, group?: str, cache: query-named-block-nodes.ret.cache, write_threshold: int, dirty-bitmaps?: [query-named-block-nodes.ret.dirty-bitmaps]}
union query-qmp-schema.ret {name: str, meta-type: query-qmp-schema.ret.meta-type, features?: [str]} tag=meta-type builtin=query-qmp-schema.ret.builtin enum=query-qmp-schema.ret.enum array=query-qmp-schema.ret.array object=query-qmp-schema.ret.object alternate=query-qmp-schema.ret.alternate command=query-qmp-schema.ret.command event=query-qmp-schema.ret.event
object query-version.ret {qemu: query-version.ret.qemu, package: str}
union transaction.actions {type: transaction.actions.type} tag=type abort=transaction.actions.abort block-dirty-bitmap-add=transaction.actions.block-dirty-bitmap-add block-dirty-bitmap-remove=transaction.actions.block-dirty-bitmap-remove block-dirty-bitmap-clear=transaction.actions.block-dirty-bitmap-remove block-dirty-bitmap-enable=transaction.actions.block-dirty-bitmap-remove block-dirty-bitmap-disable=transaction.actions.block-dirty-bitmap-remove block-dirty-bitmap-merge=transaction.actions.block-dirty-bitmap-merge blockdev-backup=transaction.actions.blockdev-backup blockdev-snapshot=transaction.actions.blockdev-snapshot blockdev-snapshot-internal-sync=transaction.actions.blockdev-snapshot-internal-sync blockdev-snapshot-sync=transaction.actions.blockdev-snapshot-sync drive-backup=transaction.actions.drive-backup
object transaction.properties {completion-mode?: transaction.properties.completion-mode}
union x-blockdev-amend.options {driver: blockdev-add.driver} tag=driver qcow2=x-blockdev-amend.options.qcow2 copy-on-read={} file={} nbd={} raw={}
object x-debug-block-dirty-bitmap-sha256.ret {sha256: str}
object x-debug-query-block-graph.ret {nodes: [x-debug-query-block-graph.ret.nodes], edges: [x-debug-query-block-graph.ret.edges]}
enum BLOCK_JOB_CANCELLED.type commit stream mirror backup create amend snapshot-load snapshot-save snapshot-delete
enum BLOCK_JOB_ERROR.operation read write
enum BLOCK_JOB_ERROR.action ignore report stop
enum JOB_STATUS_CHANGE.status undefined created running paused ready standby waiting pending aborting concluded null
object block-dirty-bitmap-merge.bitmaps2 {node: str, name: str}
enum block-export-add.type nbd vhost-user-blk fuse vduse-blk
object block-export-add.nbd {name?: str, description?: str, bitmaps?: [block-dirty-bitmap-merge.bitmaps], allocation-depth?: bool}
object block-export-add.vhost-user-blk {addr: block-export-add.vhost-user-blk.addr, logical-block-size?: int, num-queues?: int}
object block-export-add.fuse {mountpoint: str, growable?: bool, allow-other?: block-export-add.fuse.allow-other}
object block-export-add.vduse-blk {name: str, num-queues?: int, queue-size?: int, logical-block-size?: int, serial?: str}
enum blockdev-add.driver blkdebug blklogwrites blkreplay blkverify bochs cloop compress copy-before-write copy-on-read dmg file snapshot-access ftp ftps gluster host_cdrom host_device http https iscsi luks nbd nfs null-aio null-co nvme parallels preallocate qcow qcow2 qed quorum raw rbd replication ssh throttle vdi vhdx vmdk vpc vvfat
enum blockdev-add.discard ignore unmap
object blockdev-add.cache {direct?: bool, no-flush?: bool}
enum blockdev-add.detect-zeroes off on unmap
object blockdev-add.blkdebug {image: blockdev-add.copy-on-read.file, config?: str, align?: int, max-transfer?: int, opt-write-zero?: int, max-write-zero?: int, opt-discard?: int, max-discard?: int, inject-error?: [blockdev-add.blkdebug.inject-error], set-state?: [blockdev-add.blkdebug.set-state], take-child-perms?: [blockdev-add.blkdebug.take-child-perms], unshare-child-perms?: [blockdev-add.blkdebug.take-child-perms]}
object blockdev-add.blkdebug.inject-error {event: blockdev-add.blkdebug.event, state?: int, iotype?: blockdev-add.blkdebug.iotype, errno?: int, sector?: int, once?: bool, immediately?: bool}
object blockdev-add.blkdebug.set-state {event: blockdev-add.blkdebug.event, state?: int, new_state: int}
enum blockdev-add.blkdebug.event l1_update l1_grow_alloc_table l1_grow_write_table l1_grow_activate_table l2_load l2_update l2_update_compressed l2_alloc_cow_read l2_alloc_write read_aio read_backing_aio read_compressed write_aio write_compressed vmstate_load vmstate_save cow_read cow_write reftable_load reftable_grow reftable_update refblock_load refblock_update refblock_update_part refblock_alloc refblock_alloc_hookup refblock_alloc_write refblock_alloc_write_blocks refblock_alloc_write_table refblock_alloc_switch_table cluster_alloc cluster_alloc_bytes cluster_free flush_to_os flush_to_disk pwritev_rmw_head pwritev_rmw_after_head pwritev_rmw_tail pwritev_rmw_after_tail pwritev pwritev_zero pwritev_done empty_image_prepare l1_shrink_write_table l1_shrink_free_l2_clusters cor_write cluster_alloc_space none
enum blockdev-add.blkdebug.iotype read write write-zeroes discard flush block-status
enum blockdev-add.blkdebug.take-child-perms consistent-read write write-unchanged resize
object blockdev-add.blkverify {test: blockdev-add.copy-on-read.file, raw: blockdev-add.copy-on-read.file}
object blockdev-add.copy-on-read {file: blockdev-add.copy-on-read.file, bottom?: str}
object blockdev-add.null-co {size?: int, latency-ns?: int, read-zeroes?: bool}
object blockdev-add.file {filename: str, pr-manager?: str, locking?: blockdev-add.file.locking, aio?: blockdev-add.file.aio, aio-max-batch?: int, drop-cache?: bool, x-check-cache-dropped?: bool @unstable} @dynamic-auto-read-only
object blockdev-add.nbd {server: block-export-add.vhost-user-blk.addr, export?: str, tls-creds?: str, tls-hostname?: str, x-dirty-bitmap?: str @unstable, reconnect-delay?: int, open-timeout?: int}
object blockdev-add.qcow2 {file: blockdev-add.copy-on-read.file, backing?: blockdev-add.qcow2.backing, lazy-refcounts?: bool, pass-discard-request?: bool, pass-discard-snapshot?: bool, pass-discard-other?: bool, overlap-check?: blockdev-add.qcow2.overlap-check, cache-size?: int, l2-cache-size?: int, l2-cache-entry-size?: int, refcount-cache-size?: int, cache-clean-interval?: int, encrypt?: blockdev-add.qcow2.encrypt, data-file?: blockdev-add.copy-on-read.file}
object blockdev-add.raw {file: blockdev-add.copy-on-read.file, offset?: int, size?: int}
object blockdev-create.options.file {filename: str, size: int, preallocation?: blockdev-create.options.file.preallocation, nocow?: bool, extent-size-hint?: int}
object blockdev-create.options.qcow2 {file: blockdev-add.copy-on-read.file, data-file?: blockdev-add.copy-on-read.file, data-file-raw?: bool, extended-l2?: bool, size: int, version?: blockdev-create.options.qcow2.version, backing-file?: str, backing-fmt?: blockdev-add.driver, encrypt?: blockdev-create.options.qcow2.encrypt, cluster-size?: int, preallocation?: blockdev-create.options.file.preallocation, lazy-refcounts?: bool, refcount-bits?: int, compression-type?: blockdev-create.options.qcow2.compression-type}
enum nbd-server-start.addr.type inet unix vsock fd
object nbd-server-start.addr.inet {data: nbd-server-start.addr.inet.data}
object nbd-server-start.addr.unix {data: nbd-server-start.addr.unix.data}
object nbd-server-start.addr.vsock {data: nbd-server-start.addr.vsock.data}
object nbd-server-start.addr.fd {data: nbd-server-start.addr.fd.data}
enum object-add.qom-type authz-list authz-listfile authz-pam authz-simple can-bus can-host-socketcan colo-compare cryptodev-backend cryptodev-backend-builtin cryptodev-backend-lkcf cryptodev-vhost-user dbus-vmstate filter-buffer filter-dump filter-mirror filter-redirector filter-replay filter-rewriter input-barrier input-linux iothread main-loop memory-backend-epc memory-backend-file memory-backend-memfd memory-backend-ram pef-guest pr-manager-helper qtest rng-builtin rng-egd rng-random secret secret_keyring sev-guest thread-context s390-pv-guest throttle-group tls-creds-anon tls-creds-psk tls-creds-x509 tls-cipher-suites x-remote-object x-vfio-user-server
object object-add.iothread {aio-max-batch?: int, thread-pool-min?: int, thread-pool-max?: int, poll-max-ns?: int, poll-grow?: int, poll-shrink?: int}
object object-add.secret {loaded?: bool @deprecated, format?: object-add.secret.format, keyid?: str, iv?: str, data?: str, file?: str}
enum query-block.ret.io-status ok failed nospace
object query-blockstats.ret.stats {rd_bytes: int, wr_bytes: int, unmap_bytes: int, rd_operations: int, wr_operations: int, flush_operations: int, unmap_operations: int, rd_total_time_ns: int, wr_total_time_ns: int, flush_total_time_ns: int, unmap_total_time_ns: int, wr_highest_offset: int, rd_merged: int, wr_merged: int, unmap_merged: int, idle_time_ns?: int, failed_rd_operations: int, failed_wr_operations: int, failed_flush_operations: int, failed_unmap_operations: int, invalid_rd_operations: int, invalid_wr_operations: int, invalid_flush_operations: int, invalid_unmap_operations: int, account_invalid: bool, account_failed: bool, timed_stats: [query-blockstats.ret.stats.timed_stats], rd_latency_histogram?: query-blockstats.ret.stats.rd_latency_histogram, wr_latency_histogram?: query-blockstats.ret.stats.rd_latency_histogram, flush_latency_histogram?: query-blockstats.ret.stats.rd_latency_histogram}
union query-blockstats.ret.driver-specific {driver: blockdev-add.driver} tag=driver file=query-blockstats.ret.driver-specific.file copy-on-read={} nbd={} qcow2={} raw={}
object query-named-block-nodes.ret.image {filename: str, format: str, dirty-flag?: bool, actual-size?: int, virtual-size: int, cluster-size?: int, encrypted?: bool, compressed?: bool, backing-filename?: str, full-backing-filename?: str, backing-filename-format?: str, snapshots?: [blockdev-snapshot-delete-internal-sync.ret], backing-image?: query-named-block-nodes.ret.image, format-specific?: query-named-block-nodes.ret.image.format-specific}
object query-named-block-nodes.ret.cache {writeback: bool, direct: bool, no-flush: bool}
object query-named-block-nodes.ret.dirty-bitmaps {name?: str, count: int, granularity: int, recording: bool, busy: bool, persistent: bool, inconsistent?: bool}
enum query-qmp-schema.ret.meta-type builtin enum array object alternate command event
object query-qmp-schema.ret.builtin {json-type: query-qmp-schema.ret.builtin.json-type}
object query-qmp-schema.ret.enum {members: [query-qmp-schema.ret.enum.members], values: [str] @deprecated}
object query-qmp-schema.ret.array {element-type: str}
object query-qmp-schema.ret.object {members: [query-qmp-schema.ret.object.members], tag?: str, variants?: [query-qmp-schema.ret.object.variants]}
object query-qmp-schema.ret.alternate {members: [query-qmp-schema.ret.alternate.members]}
object query-qmp-schema.ret.command {arg-type: str, ret-type: str, allow-oob?: bool}
object query-qmp-schema.ret.event {arg-type: str}
object query-version.ret.qemu {major: int, minor: int, micro: int}
enum transaction.actions.type abort block-dirty-bitmap-add block-dirty-bitmap-remove block-dirty-bitmap-clear block-dirty-bitmap-enable block-dirty-bitmap-disable block-dirty-bitmap-merge blockdev-backup blockdev-snapshot blockdev-snapshot-internal-sync blockdev-snapshot-sync drive-backup
object transaction.actions.abort {data: {}}
object transaction.actions.block-dirty-bitmap-add {data: transaction.actions.block-dirty-bitmap-add.data}
object transaction.actions.block-dirty-bitmap-remove {data: block-dirty-bitmap-merge.bitmaps2}
object transaction.actions.block-dirty-bitmap-merge {data: transaction.actions.block-dirty-bitmap-merge.data}
object transaction.actions.blockdev-backup {data: transaction.actions.blockdev-backup.data}
object transaction.actions.blockdev-snapshot {data: transaction.actions.blockdev-snapshot.data}
object transaction.actions.blockdev-snapshot-internal-sync {data: transaction.actions.blockdev-snapshot-internal-sync.data}
object transaction.actions.blockdev-snapshot-sync {data: transaction.actions.blockdev-snapshot-sync.data}
object transaction.actions.drive-backup {data: transaction.actions.drive-backup.data}
enum transaction.properties.completion-mode individual grouped
object x-blockdev-amend.options.qcow2 {encrypt?: x-blockdev-amend.options.qcow2.encrypt}
object x-debug-query-block-graph.ret.nodes {id: int, type: x-debug-query-block-graph.ret.nodes.type, name: str}
object x-debug-query-block-graph.ret.edges {parent: int, child: int, name: str, perm: [x-debug-query-block-graph.ret.edges.perm], shared-perm: [x-debug-query-block-graph.ret.edges.perm]}
union block-export-add.vhost-user-blk.addr {type: nbd-server-start.addr.type} tag=type inet=nbd-server-start.addr.inet.data unix=nbd-server-start.addr.unix.data vsock=nbd-server-start.addr.vsock.data fd=nbd-server-start.addr.fd.data
enum block-export-add.fuse.allow-other off on auto
alternate blockdev-add.copy-on-read.file blockdev-add | str
enum blockdev-add.file.locking auto on off
enum blockdev-add.file.aio threads native io_uring
alternate blockdev-add.qcow2.backing blockdev-add | str | null
alternate blockdev-add.qcow2.overlap-check blockdev-add.qcow2.overlap-check2 | blockdev-add.qcow2.overlap-check3
union blockdev-add.qcow2.encrypt {format: blockdev-add.qcow2.encrypt.format} tag=format aes=blockdev-add.qcow2.encrypt.aes luks=blockdev-add.qcow2.encrypt.luks
enum blockdev-create.options.file.preallocation off metadata falloc full
enum blockdev-create.options.qcow2.version v2 v3
union blockdev-create.options.qcow2.encrypt {format: blockdev-create.options.qcow2.encrypt.format} tag=format qcow=blockdev-add.qcow2.encrypt.aes luks=blockdev-create.options.qcow2.encrypt.luks
enum blockdev-create.options.qcow2.compression-type zlib zstd
object nbd-server-start.addr.inet.data {host: str, port: str, numeric?: bool, to?: int, ipv4?: bool, ipv6?: bool, keep-alive?: bool, mptcp?: bool}
object nbd-server-start.addr.unix.data {path: str, abstract?: bool, tight?: bool}
object nbd-server-start.addr.vsock.data {cid: str, port: str}
object nbd-server-start.addr.fd.data {str: str}
enum object-add.secret.format raw base64
object query-blockstats.ret.stats.timed_stats {interval_length: int, min_rd_latency_ns: int, max_rd_latency_ns: int, avg_rd_latency_ns: int, min_wr_latency_ns: int, max_wr_latency_ns: int, avg_wr_latency_ns: int, min_flush_latency_ns: int, max_flush_latency_ns: int, avg_flush_latency_ns: int, avg_rd_queue_depth: number, avg_wr_queue_depth: number}
object query-blockstats.ret.stats.rd_latency_histogram {boundaries: [int], bins: [int]}
object query-blockstats.ret.driver-specific.file {discard-nb-ok: int, discard-nb-failed: int, discard-bytes-ok: int}
union query-named-block-nodes.ret.image.format-specific {type: query-named-block-nodes.ret.image.format-specific.type} tag=type qcow2=query-named-block-nodes.ret.image.format-specific.qcow2
enum query-qmp-schema.ret.builtin.json-type string number int boolean null object array value
object query-qmp-schema.ret.enum.members {name: str, features?: [str]}
object query-qmp-schema.ret.object.members {name: str, type: str, default?: any, features?: [str]}
object query-qmp-schema.ret.object.variants {case: str, type: str}
object query-qmp-schema.ret.alternate.members {type: str}
object transaction.actions.block-dirty-bitmap-add.data {node: str, name: str, granularity?: int, persistent?: bool, disabled?: bool}
object transaction.actions.block-dirty-bitmap-merge.data {node: str, target: str, bitmaps: [block-dirty-bitmap-merge.bitmaps]}
object transaction.actions.blockdev-backup.data {job-id?: str, device: str, sync: blockdev-backup.sync, speed?: int, bitmap?: str, bitmap-mode?: blockdev-backup.bitmap-mode, compress?: bool, on-source-error?: block-commit.on-error, on-target-error?: block-commit.on-error, auto-finalize?: bool, auto-dismiss?: bool, filter-node-name?: str, x-perf?: blockdev-backup.x-perf @unstable, target: str}
object transaction.actions.blockdev-snapshot.data {node: str, overlay: str}
object transaction.actions.blockdev-snapshot-internal-sync.data {device: str, name: str}
object transaction.actions.blockdev-snapshot-sync.data {device?: str, node-name?: str, snapshot-file: str, snapshot-node-name?: str, format?: str, mode?: blockdev-snapshot-sync.mode}
object transaction.actions.drive-backup.data {job-id?: str, device: str, sync: blockdev-backup.sync, speed?: int, bitmap?: str, bitmap-mode?: blockdev-backup.bitmap-mode, compress?: bool, on-source-error?: block-commit.on-error, on-target-error?: block-commit.on-error, auto-finalize?: bool, auto-dismiss?: bool, filter-node-name?: str, x-perf?: blockdev-backup.x-perf @unstable, target: str, format?: str, mode?: blockdev-snapshot-sync.mode}
union x-blockdev-amend.options.qcow2.encrypt {format: blockdev-create.options.qcow2.encrypt.format} tag=format luks=x-blockdev-amend.options.qcow2.encrypt.luks qcow={}
enum x-debug-query-block-graph.ret.nodes.type block-backend block-job block-driver
enum x-debug-query-block-graph.ret.edges.perm consistent-read write write-unchanged resize
object blockdev-add.qcow2.overlap-check2 {template?: blockdev-add.qcow2.overlap-check3, main-header?: bool, active-l1?: bool, active-l2?: bool, refcount-table?: bool, refcount-block?: bool, snapshot-table?: bool, inactive-l1?: bool, inactive-l2?: bool, bitmap-directory?: bool}
enum blockdev-add.qcow2.overlap-check3 none constant cached all
enum blockdev-add.qcow2.encrypt.format aes luks
object blockdev-add.qcow2.encrypt.aes {key-secret?: str}
object blockdev-add.qcow2.encrypt.luks {key-secret?: str}
enum blockdev-create.options.qcow2.encrypt.format qcow luks
object blockdev-create.options.qcow2.encrypt.luks {key-secret?: str, cipher-alg?: blockdev-create.options.qcow2.encrypt.luks.cipher-alg, cipher-mode?: blockdev-create.options.qcow2.encrypt.luks.cipher-mode, ivgen-alg?: blockdev-create.options.qcow2.encrypt.luks.ivgen-alg, ivgen-hash-alg?: blockdev-create.options.qcow2.encrypt.luks.ivgen-hash-alg, hash-alg?: blockdev-create.options.qcow2.encrypt.luks.ivgen-hash-alg, iter-time?: int}
enum query-named-block-nodes.ret.image.format-specific.type qcow2 vmdk luks rbd
object query-named-block-nodes.ret.image.format-specific.qcow2 {data: query-named-block-nodes.ret.image.format-specific.qcow2.data}
object x-blockdev-amend.options.qcow2.encrypt.luks {state: x-blockdev-amend.options.qcow2.encrypt.luks.state, new-secret?: str, old-secret?: str, keyslot?: int, iter-time?: int, secret?: str}
enum blockdev-create.options.qcow2.encrypt.luks.cipher-alg aes-128 aes-192 aes-256 des 3des cast5-128 serpent-128 serpent-192 serpent-256 twofish-128 twofish-192 twofish-256
enum blockdev-create.options.qcow2.encrypt.luks.cipher-mode ecb cbc xts ctr
enum blockdev-create.options.qcow2.encrypt.luks.ivgen-alg plain plain64 essiv
enum blockdev-create.options.qcow2.encrypt.luks.ivgen-hash-alg md5 sha1 sha224 sha256 sha384 sha512 ripemd160
object query-named-block-nodes.ret.image.format-specific.qcow2.data {compat: str, data-file?: str, data-file-raw?: bool, extended-l2?: bool, lazy-refcounts?: bool, corrupt?: bool, refcount-bits: int, encrypt?: query-named-block-nodes.ret.image.format-specific.qcow2.data.encrypt, bitmaps?: [query-named-block-nodes.ret.image.format-specific.qcow2.data.bitmaps], compression-type: blockdev-create.options.qcow2.compression-type}
enum x-blockdev-amend.options.qcow2.encrypt.luks.state active inactive
union query-named-block-nodes.ret.image.format-specific.qcow2.data.encrypt {format: blockdev-add.qcow2.encrypt.format} tag=format luks=query-named-block-nodes.ret.image.format-specific.qcow2.data.encrypt.luks aes={}
object query-named-block-nodes.ret.image.format-specific.qcow2.data.bitmaps {name: str, granularity: int, flags: [query-named-block-nodes.ret.image.format-specific.qcow2.data.bitmaps.flags]}
object query-named-block-nodes.ret.image.format-specific.qcow2.data.encrypt.luks {cipher-alg: blockdev-create.options.qcow2.encrypt.luks.cipher-alg, cipher-mode: blockdev-create.options.qcow2.encrypt.luks.cipher-mode, ivgen-alg: blockdev-create.options.qcow2.encrypt.luks.ivgen-alg, ivgen-hash-alg?: blockdev-create.options.qcow2.encrypt.luks.ivgen-hash-alg, hash-alg: blockdev-create.options.qcow2.encrypt.luks.ivgen-hash-alg, payload-offset: int, master-key-iters: int, uuid: str, slots: [query-named-block-nodes.ret.image.format-specific.qcow2.data.encrypt.luks.slots]}
enum query-named-block-nodes.ret.image.format-specific.qcow2.data.bitmaps.flags in-use auto
object query-named-block-nodes.ret.image.format-specific.qcow2.data.encrypt.luks.slots {active: bool, iters?: int, stripes?: int, key-offset: int}
command query-iothreads {} -> [IOThreadInfo]
object IOThreadInfo {id: str, thread-id: int, poll-max-ns: int, poll-grow: int, poll-shrink: int, aio-max-batch: int}
command cont {} -> {}
command stop {} -> {}
command system_reset {} -> {}
command system_powerdown {} -> {}
command query-status {} -> StatusInfo
object StatusInfo {running: bool, singlestep: bool, status: RunState}
enum RunState debug inmigrate internal-error io-error paused postmigrate prelaunch finish-migrate restore-vm running save-vm shutdown suspended watchdog guest-panicked colo
event STOP {}
event RESUME {}
event POWERDOWN {}
event SHUTDOWN {guest: bool, reason: ShutdownCause}
enum ShutdownCause none host-error host-qmp-quit host-qmp-system-reset host-signal host-ui guest-shutdown guest-reset guest-panic subsystem-reset snapshot-load
"""#

    struct Member {
        var name: String, type: String, optional: Bool, features: [String]
    }

    enum Def {
        case object([Member], tag: String?, variants: [(String, String)])
        case enumeration([String])
        case alternate([String])
    }

    struct Entry {
        var kind: String, name: String, args: String, ret: String, features: [String]
    }

    /// The parsed table: commands and events, and the named types.
    static let parsed: (entries: [Entry], types: [String: (Def, [String])]) = parse(table)

    /// The command names the table describes.
    static var commandNames: Set<String> { Set(parsed.entries.filter { $0.kind == "command" }.map(\.name)) }

    /// The members of command `name`'s arguments (nil: no such command or not an object).
    static func argumentMembers(_ name: String) -> [Member]? {
        guard let e = parsed.entries.first(where: { $0.kind == "command" && $0.name == name }),
              case .object(let m, _, _)? = parsed.types[e.args]?.0 else { return nil }
        return m
    }

    private static func splitFeatures(_ s: Substring) -> (Substring, [String]) {
        guard let at = s.firstIndex(of: "@") else { return (s, []) }
        return (s[..<at], s[s.index(after: at)...].split(separator: "@").map { String($0.trimmingSpaces) })
    }

    /// `{a: T, b?: T @f}` → members.
    private static func members(_ s: Substring) -> [Member] {
        let body = s.trimmingSpaces.dropFirst().dropLast()
        guard !body.trimmingSpaces.isEmpty else { return [] }
        return body.split(separator: ",").map { item in
            let (text, features) = splitFeatures(item)
            let parts = text.split(separator: ":", maxSplits: 1)
            var name = String(parts[0].trimmingSpaces)
            let optional = name.hasSuffix("?")
            if optional { name.removeLast() }
            return Member(name: name, type: String(parts.count > 1 ? parts[1].trimmingSpaces : "any"), optional: optional, features: features)
        }
    }

    static func parse(_ text: String) -> (entries: [Entry], types: [String: (Def, [String])]) {
        var entries: [Entry] = []
        var types: [String: (Def, [String])] = ["{}": (.object([], tag: nil, variants: []), [])]
        for raw in text.split(separator: "\n") where !raw.trimmingSpaces.isEmpty {
            let words = raw.split(separator: " ", maxSplits: 2)
            guard words.count >= 2 else { continue }
            let kind = String(words[0]), name = String(words[1])
            let rest = words.count > 2 ? words[2] : ""
            switch kind {
            case "command", "event":
                var argText = rest, retText: Substring = "{}"
                if let arrow = rest.range(of: " -> ") {
                    argText = rest[..<arrow.lowerBound]
                    retText = rest[arrow.upperBound...]
                }
                var features: [String] = []
                if kind == "event" { (argText, features) = splitFeatures(argText) } else { (retText, features) = splitFeatures(retText) }
                var args = String(argText.trimmingSpaces)
                if args.hasPrefix("{") && args != "{}" {
                    let anon = "\(kind):\(name)"
                    types[anon] = (.object(members(argText), tag: nil, variants: []), [])
                    args = anon
                }
                entries.append(Entry(kind: kind, name: name, args: args, ret: String(retText.trimmingSpaces), features: features))
            case "object":
                let (body, features) = splitFeatures(rest)
                types[name] = (.object(members(body), tag: nil, variants: []), features)
            case "union":
                let (text, features) = splitFeatures(rest)
                guard let close = text.range(of: "} tag=") else { continue }
                let base = members(text[...close.lowerBound])
                let tail = text[close.upperBound...].split(separator: " ")
                let variants = tail.dropFirst().compactMap { v -> (String, String)? in
                    let p = v.split(separator: "=", maxSplits: 1)
                    return p.count == 2 ? (String(p[0]), String(p[1])) : nil
                }
                types[name] = (.object(base, tag: tail.first.map(String.init), variants: variants), features)
            case "enum":
                let (body, features) = splitFeatures(rest)
                types[name] = (.enumeration(body.split(separator: " ").map(String.init)), features)
            case "alternate":
                types[name] = (.alternate(rest.split(separator: "|").map { String($0.trimmingSpaces) }), [])
            default:
                continue
            }
        }
        return (entries, types)
    }

    static let builtins: [(String, String)] = [("str", "string"), ("any", "value"), ("bool", "boolean"), ("int", "int"),
                                               ("null", "null"), ("number", "number")]

    /// The SchemaInfo list for `commands` (in that order) and every event of the table.
    static func schema(commands: [String]) -> QObject {
        var ids: [String: String] = ["{}": "0"]
        var pending: [String] = ["{}"]
        var arrays: [QObject] = []
        var seenArrays = Set<String>()
        var counter = 1
        func ref(_ t: String) -> String {
            if builtins.contains(where: { $0.0 == t }) { return t }
            if t.hasPrefix("[") && t.hasSuffix("]") {
                let inner = ref(String(t.dropFirst().dropLast()))
                let name = "[\(inner)]"
                if seenArrays.insert(name).inserted {
                    arrays.append(.dict(QObject.Dict([("name", .string(name)), ("element-type", .string(inner)),
                                                      ("meta-type", .string("array"))])))
                }
                return name
            }
            if let id = ids[t] { return id }
            let id = String(counter)
            counter += 1
            ids[t] = id
            pending.append(t)
            return id
        }
        func featureList(_ f: [String]) -> QObject { .list(f.map { .string($0) }) }
        var out: [QObject] = []
        let byName = Dictionary(parsed.entries.filter { $0.kind == "command" }.map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
        for c in commands {
            let e = byName[c] ?? Entry(kind: "command", name: c, args: "{}", ret: "any", features: [])
            var d = QObject.Dict([("name", .string(c)), ("ret-type", .string(ref(e.ret))), ("meta-type", .string("command")),
                                  ("arg-type", .string(ref(e.args)))])
            if !e.features.isEmpty { d["features"] = featureList(e.features) }
            out.append(.dict(d))
        }
        for e in parsed.entries where e.kind == "event" {
            var d = QObject.Dict([("name", .string(e.name)), ("meta-type", .string("event")), ("arg-type", .string(ref(e.args)))])
            if !e.features.isEmpty { d["features"] = featureList(e.features) }
            out.append(.dict(d))
        }
        var i = 0
        while i < pending.count {
            let key = pending[i]
            i += 1
            let id = ids[key] ?? key
            guard let (def, features) = parsed.types[key] else {
                // A name the table does not define: described as any value rather than dropped.
                out.append(.dict(QObject.Dict([("name", .string(id)), ("members", .list([])), ("meta-type", .string("object"))])))
                continue
            }
            var d = QObject.Dict([("name", .string(id))])
            switch def {
            case .object(let members, let tag, let variants):
                d["members"] = .list(members.map { m in
                    var md = QObject.Dict([("name", .string(m.name))])
                    if m.optional { md["default"] = .null }
                    md["type"] = .string(ref(m.type))
                    if !m.features.isEmpty { md["features"] = featureList(m.features) }
                    return .dict(md)
                })
                d["meta-type"] = .string("object")
                if let tag {
                    d["tag"] = .string(tag)
                    d["variants"] = .list(variants.map { .dict(QObject.Dict([("case", .string($0.0)), ("type", .string(ref($0.1)))])) })
                }
            case .enumeration(let values):
                d["members"] = .list(values.map { .dict(QObject.Dict([("name", .string($0))])) })
                d["meta-type"] = .string("enum")
                d["values"] = .list(values.map { .string($0) })
            case .alternate(let types):
                d["members"] = .list(types.map { .dict(QObject.Dict([("type", .string(ref($0)))])) })
                d["meta-type"] = .string("alternate")
            }
            if !features.isEmpty { d["features"] = featureList(features) }
            out.append(.dict(d))
        }
        out += arrays
        out += builtins.map { .dict(QObject.Dict([("name", .string($0.0)), ("json-type", .string($0.1)), ("meta-type", .string("builtin"))])) }
        return .list(out)
    }
}

extension Substring {
    var trimmingSpaces: Substring {
        var s = self
        while s.first == " " { s = s.dropFirst() }
        while s.last == " " { s = s.dropLast() }
        return s
    }
}

extension QMPMonitor {
    func registerSchemaCommands() {
        register("query-qmp-schema", exclusive: false) { args, ctx in
            try args.done()
            return QMPSchema.schema(commands: ["qmp_capabilities"] + ctx.monitor.commandNames)
        }
    }
}
