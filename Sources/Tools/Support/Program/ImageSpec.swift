import QBlock

/// How the tools open the image named on their command line: a plain file name through
/// ``ImageOpener``; a `json:` pseudo-filename, an `--image-opts` option string or extra
/// `-o` options through ``DriveOpener`` (QEMU's `bdrv_open` with options).
package enum ImageSpec {
    /// Whether `name` needs ``DriveOpener`` (a `json:` name, `--image-opts`, or options).
    package static func isDriveSpec(_ name: String, imageOpts: Bool, extra: QObject.Dict = QObject.Dict()) -> Bool {
        imageOpts || DriveOptions.isJSONFilename(name) || !extra.entries.isEmpty
    }

    /// Opens `name` in the mode `options` gives: with `imageOpts`, `name` is a QemuOpts
    /// string (`driver=qcow2,file.filename=...`, a bare first element being `file`; QEMU's
    /// deprecation warnings go to `warning`); otherwise a file name (maybe `json:{...}`) with
    /// `extra` options on top.
    /// - Throws: ``BlockError``; for a drive spec its message is QEMU's `bdrv_open` error
    ///   without the "Could not open 'NAME': " the tools put in front.
    package static func open(_ name: String, imageOpts: Bool, options: OpenOptions,
                             extra: QObject.Dict = QObject.Dict(), warning: ((String) -> Void)? = nil) async throws -> any BlockDriver {
        guard isDriveSpec(name, imageOpts: imageOpts, extra: extra) else {
            return try await ImageOpener.open(name, options: options)
        }
        do {
            if imageOpts {
                var opts = try DriveOptions.parse(name, impliedKey: "file", warning: warning)
                for (k, v) in extra.entries { opts[k] = v }
                return try await DriveOpener.open(filename: nil, options: opts, defaults: options)
            }
            return try await DriveOpener.open(filename: name, options: extra, defaults: options)
        } catch let e as QMPError {
            throw BlockError(.invalidArgument, e.desc, operation: "open options")
        }
    }

    /// Prints a QemuOpts deprecation warning as QEMU does: "NAME: warning: " before its
    /// first line.
    package static func printWarning(_ tool: ToolProgram) -> (String) -> Void {
        { tool.printError("warning: " + $0) }
    }

    /// The objects of `--object` options (QemuOpts strings, the type first).
    /// - Throws: ``BlockError`` with `object-add`'s message.
    package static func objects(_ specs: [String]) throws -> QMPObjects {
        do {
            return try QMPObjects.commandLine(specs)
        } catch let e as QMPError {
            throw BlockError(.invalidArgument, e.desc, operation: "object-add")
        }
    }
}
