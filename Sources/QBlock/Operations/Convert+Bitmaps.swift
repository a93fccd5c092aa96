import QBlockBitmaps
import QBlockCore
import QBlockDrivers
import QBlockGraph
/// `qemu-img convert --bitmaps [--skip-broken-bitmaps]`: copying the persistent bitmaps of
/// the (single) source into the target after the data (qemu-img 7.2's
/// `convert_check_bitmaps` and `convert_copy_bitmaps`).
extension Convert {
    /// Before the target is created: the source must be able to hold bitmaps, and (unless
    /// `skipBroken`) none of its persistent bitmaps may be inconsistent.
    static func checkSourceBitmaps(_ sources: [any BlockDriver], skipBroken: Bool) throws {
        guard sources.count == 1 else {
            throw BlockError(.invalidArgument, "Copying bitmaps only possible with single source")
        }
        guard let q = sources[0] as? any PersistentBitmapStore, q.supportsPersistentBitmaps else {
            throw BlockError(.unsupported, "Source lacks bitmap support")
        }
        // QEMU walks a node's bitmaps newest first (the last in the directory first).
        if !skipBroken, let b = q.persistentBitmaps.all.last(where: { $0.isPersistent && $0.isInconsistent }) {
            throw BlockError(.invalidArgument, "Cannot copy inconsistent bitmap '\(b.name)'\n"
                             + "Try --skip-broken-bitmaps, or use 'qemu-img bitmap --remove' to delete it")
        }
    }

    /// After the target is opened: it must be able to store bitmaps.
    static func checkTargetBitmaps(_ target: any BlockDriver) throws {
        guard let q = target as? any PersistentBitmapStore, q.supportsPersistentBitmaps else {
            throw BlockError(.unsupported, "Format driver '\(target.driverName)' does not support bitmaps")
        }
    }

    /// After the copy: adds each persistent bitmap of `source` to `target` with the same
    /// name, granularity and enabled state, and merges the bits in. Inconsistent ones are
    /// skipped with a warning when `skipBroken` (else ``checkSourceBitmaps`` refused them).
    static func copyBitmaps(from source: any BlockDriver, to target: any BlockDriver, skipBroken: Bool,
                            warning: (@Sendable (String) -> Void)?) async throws {
        guard let src = source as? any PersistentBitmapStore, let dst = target as? any PersistentBitmapStore else { return }
        for b in src.persistentBitmaps.all.reversed() where b.isPersistent {
            if skipBroken && b.isInconsistent {
                warning?("Skipping inconsistent bitmap '\(b.name)'")
                continue
            }
            let copy: DirtyBitmap
            do {
                copy = try dst.addPersistentBitmap(name: b.name, granularity: b.granularity, disabled: !b.isEnabled, nodeName: nil)
            } catch {
                throw BlockError(.invalidArgument, "Failed to create bitmap \(b.name): \(error.asBlockError.message)")
            }
            do {
                if let e = b.useError(allowReadOnly: true) { throw e }
                try copy.merge(from: b)
            } catch {
                try? await dst.removePersistentBitmap(named: b.name)
                throw BlockError(.invalidArgument, "Failed to populate bitmap \(b.name): \(error.asBlockError.message)")
            }
        }
    }
}
