// swift-tools-version: 6.1
import PackageDescription

let package = Package(
    name: "QBlock",
    platforms: [.macOS(.v14)],
    products: [
        .library(name: "QBlock", targets: ["QBlock"]),
        .executable(name: "img", targets: ["img"]),
        .executable(name: "io", targets: ["io"]),
        .executable(name: "nbd", targets: ["nbd"]),
        .library(name: "QMachine", targets: ["QMachine"]),
        .executable(name: "vm", targets: ["vm"]),
    ],
    // The tools (img, io, nbd, vm) parse their command lines with swift-argument-parser; the
    // library does not. A package that depends on QBlock with `traits: []` turns the trait
    // off, and SwiftPM then neither fetches nor builds swift-argument-parser for it.
    traits: [
        .trait(name: "Tools", description: "The command-line tools' dependency, swift-argument-parser."),
        .default(enabledTraits: ["Tools"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
    ],
    targets: [
        .systemLibrary(name: "CZlib", path: "Sources/CZlib"),
        .systemLibrary(name: "CZstd", path: "Sources/CZstd"),
        .target(name: "CSupport", path: "Sources/CSupport"),
        .target(name: "CKVM", path: "Sources/CKVM"),
        // The library, one target per layer; dependencies point down only (docs/architecture.md).
        .target(name: "QBlockCore", dependencies: ["CSupport"], path: "Sources/QBlock/Core"),
        .target(name: "QBlockNBDWire", dependencies: ["QBlockCore"], path: "Sources/QBlock/NBDWire"),
        .target(name: "QBlockBitmaps", dependencies: ["QBlockCore"], path: "Sources/QBlock/Bitmaps"),
        .target(name: "QBlockGraph", dependencies: ["QBlockCore", "QBlockBitmaps"], path: "Sources/QBlock/Graph"),
        .target(name: "QBlockDrivers", dependencies: ["QBlockCore", "QBlockBitmaps", "QBlockGraph", "QBlockNBDWire", "CZlib", "CZstd", "CSupport"], path: "Sources/QBlock/Drivers"),
        .target(name: "QBlockOpen", dependencies: ["QBlockCore", "QBlockBitmaps", "QBlockGraph", "QBlockDrivers"], path: "Sources/QBlock/Open"),
        .target(name: "QBlockOperations", dependencies: ["QBlockCore", "QBlockBitmaps", "QBlockGraph", "QBlockDrivers", "QBlockOpen", "CSupport"], path: "Sources/QBlock/Operations"),
        .target(name: "QBlockJobs", dependencies: ["QBlockCore", "QBlockBitmaps", "QBlockGraph", "QBlockDrivers", "QBlockOpen", "QBlockOperations"], path: "Sources/QBlock/Jobs"),
        .target(name: "QBlockNBDServer", dependencies: ["QBlockCore", "QBlockBitmaps", "QBlockGraph", "QBlockNBDWire", "QBlockDrivers", "QBlockOpen", "QBlockOperations", "QBlockJobs"], path: "Sources/QBlock/NBDServer"),
        // The high-level API (Image, LiveDisk, job handles); the monitor is one of its clients.
        .target(name: "QBlockAPI", dependencies: ["QBlockCore", "QBlockBitmaps", "QBlockGraph", "QBlockNBDWire", "QBlockDrivers", "QBlockOpen", "QBlockOperations", "QBlockJobs", "QBlockNBDServer"], path: "Sources/QBlock/API"),
        .target(name: "QBlockMonitor", dependencies: ["QBlockCore", "QBlockBitmaps", "QBlockGraph", "QBlockNBDWire", "QBlockDrivers", "QBlockOpen", "QBlockOperations", "QBlockJobs", "QBlockNBDServer", "QBlockAPI"], path: "Sources/QBlock/Monitor"),
        // The umbrella: `import QBlock` re-exports every layer's public API.
        .target(
            name: "QBlock",
            dependencies: ["QBlockCore", "QBlockNBDWire", "QBlockBitmaps", "QBlockGraph", "QBlockDrivers", "QBlockOpen", "QBlockOperations", "QBlockJobs", "QBlockNBDServer", "QBlockAPI", "QBlockMonitor"],
            path: "Sources/QBlock",
            exclude: ["Core", "NBDWire", "Bitmaps", "Graph", "Drivers", "Open", "Operations", "Jobs", "NBDServer", "API", "Monitor"]
        ),
        // What the tools share and the library does not need: the qemu-io command language,
        // qemu-img's text output, the tools' error reporting.
        .target(
            name: "ToolSupport",
            dependencies: ["QBlock", .product(name: "ArgumentParser", package: "swift-argument-parser", condition: .when(traits: ["Tools"]))],
            path: "Sources/Tools/Support"
        ),
        .target(
            name: "QMachine",
            dependencies: ["QBlock", "CKVM"],
            path: "Sources/QMachine"
        ),
        .executableTarget(
            name: "img",
            dependencies: ["QBlock", "ToolSupport", .product(name: "ArgumentParser", package: "swift-argument-parser", condition: .when(traits: ["Tools"]))],
            path: "Sources/Tools/img"
        ),
        .executableTarget(
            name: "io",
            dependencies: ["QBlock", "ToolSupport", .product(name: "ArgumentParser", package: "swift-argument-parser", condition: .when(traits: ["Tools"]))],
            path: "Sources/Tools/io"
        ),
        .executableTarget(
            name: "nbd",
            dependencies: ["QBlock", "ToolSupport", .product(name: "ArgumentParser", package: "swift-argument-parser", condition: .when(traits: ["Tools"]))],
            path: "Sources/Tools/nbd"
        ),
        .executableTarget(
            name: "vm",
            dependencies: ["QMachine", "QBlock", "ToolSupport", .product(name: "ArgumentParser", package: "swift-argument-parser", condition: .when(traits: ["Tools"]))],
            path: "Sources/Tools/vm"
        ),
        .target(
            name: "TestSupport",
            dependencies: ["QBlock"],
            path: "Tests/TestSupport"
        ),
        .executableTarget(
            name: "qblock-stress",
            dependencies: ["QBlock", "TestSupport"],
            path: "Tests/Stress"
        ),
        .executableTarget(
            name: "qblock-mirror-crash",
            dependencies: ["QBlock", "TestSupport"],
            path: "Tests/MirrorCrash"
        ),
        // One test target per library layer; shared fixtures only in TestSupport.
        .testTarget(name: "QBlockCoreTests", dependencies: ["QBlock", "TestSupport"], path: "Tests/QBlockCoreTests"),
        .testTarget(name: "QBlockBitmapsTests", dependencies: ["QBlock", "TestSupport"], path: "Tests/QBlockBitmapsTests"),
        .testTarget(name: "QBlockGraphTests", dependencies: ["QBlock", "TestSupport"], path: "Tests/QBlockGraphTests"),
        // CloseSafetyTests compares the check report as `img check` renders it with qemu-img's.
        .testTarget(name: "QBlockDriversTests", dependencies: ["QBlock", "TestSupport", "ToolSupport"], path: "Tests/QBlockDriversTests"),
        .testTarget(name: "QBlockOperationsTests", dependencies: ["QBlock", "TestSupport"], path: "Tests/QBlockOperationsTests"),
        .testTarget(name: "QBlockJobsTests", dependencies: ["QBlock", "TestSupport"], path: "Tests/QBlockJobsTests"),
        .testTarget(name: "QBlockNBDServerTests", dependencies: ["QBlock", "TestSupport"], path: "Tests/QBlockNBDServerTests"),
        .testTarget(name: "QBlockAPITests", dependencies: ["QBlock", "TestSupport"], path: "Tests/QBlockAPITests"),
        .testTarget(name: "QBlockMonitorTests", dependencies: ["QBlock", "TestSupport"], path: "Tests/QBlockMonitorTests"),
        .testTarget(name: "ToolTests", dependencies: ["QBlock", "TestSupport", "ToolSupport"], path: "Tests/ToolTests"),
        .testTarget(
            name: "QMachineTests",
            dependencies: ["QMachine", "QBlock", "TestSupport"],
            path: "Tests/QMachineTests"
        ),
    ],
    swiftLanguageModes: [.v6]
)
