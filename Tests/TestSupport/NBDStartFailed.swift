import Foundation
import Testing
import QBlock

public struct NBDStartFailed: Error, CustomStringConvertible {
    public let description: String
    public init(description: String) { self.description = description }
}
