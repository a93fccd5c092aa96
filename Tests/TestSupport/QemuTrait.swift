import Foundation
import Testing
import QBlock

public let qemuTrait = Testing.ConditionTrait.enabled(if: Tools.qemuAvailable, Comment(rawValue: Tools.qemuMissing))
