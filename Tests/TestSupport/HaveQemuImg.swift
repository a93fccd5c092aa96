import Foundation
import Testing
import QBlock

public let haveQemuImg = FileManager.default.isExecutableFile(atPath: "/usr/bin/qemu-img")
