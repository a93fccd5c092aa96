import QBlock

extension DriveSpec {
    /// The `blockdev-add` arguments QEMU's `-drive` amounts to: a format node (named
    /// `nodeName`) on a protocol node — a `file` node for a path, an `nbd` node for an NBD
    /// URI — with the image's backing chain opened below it.
    /// - Throws: the protocol's error for a file name it cannot use (`.invalidArgument` for an
    ///   NBD URI that does not parse).
    public func blockdevArguments(nodeName: String) throws -> QObject.Dict {
        // The protocol node as the protocol registry builds it for a file name (a `file` node
        // for a path, an `nbd` node for an NBD URI); only host files are probed for their
        // format, anything else is raw unless told, as QEMU's -drive.
        let protocolNode = try ProtocolRegistry.blockdevOptions(forFilename: file)
        let fmt = format ?? ((try? ImageOpener.probe(file)) ?? "raw")
        return QObject.Dict([("driver", .string(fmt)), ("node-name", .string(nodeName)), ("read-only", .bool(readOnly)),
                             ("file", .dict(protocolNode))])
    }

    /// Opens the drive into `monitor`'s graph with the monitor's own `blockdev-add` (so
    /// `query-named-block-nodes` shows it as QEMU would) and attaches a ``BlockBackend``
    /// named `id`: the handle the device model holds, which live snapshots and mirror
    /// pivots switch to a new node without the device noticing.
    /// - Parameter id: the drive id (QMP's device name); the format node is named
    ///   `node-name`, or `ID-format` when the drive has none.
    /// - Throws: ``QMPError`` with QEMU's wording ("Could not open 'PATH': …").
    /// - Parameter qdev: the device's QOM path, reported as `qdev` by `query-block`.
    public func attach(to monitor: QMPMonitor, id: String, qdev: String? = nil) async throws -> BlockBackend {
        // QEMU generates "#block…" names for -drive; blockdev-add refuses them, so a drive
        // without node-name gets libvirt's convention instead.
        let name = nodeName ?? "\(id)-format"
        try await monitor.execute("blockdev-add", arguments: try blockdevArguments(nodeName: name))
        guard let node = monitor.graph.node(named: name) else {
            throw QMPError.generic("node '\(name)' vanished after blockdev-add")
        }
        let backend = BlockBackend(name: id, node: node, qdev: qdev)
        monitor.graph.attach(backend)
        return backend
    }
}
