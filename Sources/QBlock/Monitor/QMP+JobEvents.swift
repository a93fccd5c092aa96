import QBlockCore
import QBlockJobs

/// The QMP form of the jobs' typed events: the jobs layer reports ``JobNotification``s and
/// names no QMP event; this is where they get QEMU 7.2's event names and `data` members
/// (`qapi/job.json`, `qapi/block-core.json`).
enum QMPJobEvents {
    /// The QMP event for `notification`: its name and `data`, or nil when QEMU sends none
    /// for it (`BLOCK_JOB_COMPLETED` and `BLOCK_JOB_CANCELLED` exist for block jobs only).
    static func event(for notification: JobNotification) -> (name: String, data: QObject.Dict)? {
        let n = notification
        switch n.event {
        case .statusChanged(let status):
            return ("JOB_STATUS_CHANGE", QObject.Dict([("id", .string(n.jobID)), ("status", .string(status.rawValue))]))
        case .ready:
            return ("BLOCK_JOB_READY", blockJobFigures(n))
        case .ioError(let e):
            return ("BLOCK_JOB_ERROR", QObject.Dict([("device", .string(n.jobID)),
                                                     ("operation", .string(e.isRead ? "read" : "write")),
                                                     ("action", .string(e.action.rawValue))]))
        case .pending:
            return ("BLOCK_JOB_PENDING", QObject.Dict([("type", .string(n.jobType.rawValue)), ("id", .string(n.jobID))]))
        case .completed(let failure):
            guard n.jobType.isBlockJob else { return nil }
            var d = blockJobFigures(n)
            if let failure { d["error"] = .string(Job.message(of: failure)) }
            return ("BLOCK_JOB_COMPLETED", d)
        case .cancelled:
            guard n.jobType.isBlockJob else { return nil }
            return ("BLOCK_JOB_CANCELLED", blockJobFigures(n))
        }
    }

    /// The members every `BLOCK_JOB_READY`, `_COMPLETED` and `_CANCELLED` event has.
    private static func blockJobFigures(_ n: JobNotification) -> QObject.Dict {
        QObject.Dict([("type", .string(n.jobType.rawValue)), ("device", .string(n.jobID)),
                      ("len", .int(Int64(n.total))), ("offset", .int(Int64(n.completed))),
                      ("speed", .int(Int64(n.speed)))])
    }
}
