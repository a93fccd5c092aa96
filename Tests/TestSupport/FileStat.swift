import Foundation
import Testing
import QBlock

public func fileStat(_ path: String) -> (size: Int64, blocks: Int64)? {
    var st = stat()
    guard stat(path, &st) == 0 else { return nil }
    return (Int64(st.st_size), Int64(st.st_blocks))
}
