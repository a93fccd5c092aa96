import Foundation
import Testing
import QBlock

public func tempDir() throws -> String {
    let d = NSTemporaryDirectory() + "qblock-\(UUID().uuidString)"
    try FileManager.default.createDirectory(atPath: d, withIntermediateDirectories: true)
    return d
}
