// swift-tools-version: 6.0
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
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
    ],
    targets: [
        .systemLibrary(name: "CZlib", path: "Sources/CZlib"),
        .systemLibrary(name: "CZstd", path: "Sources/CZstd"),
        .target(name: "CSupport", path: "Sources/CSupport"),
        .target(name: "CKVM", path: "Sources/CKVM"),
        .target(
            name: "QBlock",
            dependencies: ["CZlib", "CZstd", "CSupport"],
            path: "Sources/QBlock"
        ),
        .target(
            name: "QMachine",
            dependencies: ["QBlock", "CKVM"],
            path: "Sources/QMachine"
        ),
        .executableTarget(
            name: "img",
            dependencies: ["QBlock", .product(name: "ArgumentParser", package: "swift-argument-parser")],
            path: "Sources/Tools/img"
        ),
        .executableTarget(
            name: "io",
            dependencies: ["QBlock", .product(name: "ArgumentParser", package: "swift-argument-parser")],
            path: "Sources/Tools/io"
        ),
        .executableTarget(
            name: "nbd",
            dependencies: ["QBlock", .product(name: "ArgumentParser", package: "swift-argument-parser")],
            path: "Sources/Tools/nbd"
        ),
        .executableTarget(
            name: "vm",
            dependencies: ["QMachine", "QBlock", .product(name: "ArgumentParser", package: "swift-argument-parser")],
            path: "Sources/Tools/vm"
        ),
        .executableTarget(
            name: "ReadWriteExample",
            dependencies: ["QBlock"],
            path: "Examples/ReadWrite"
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
        .testTarget(
            name: "QBlockTests",
            dependencies: ["QBlock", "TestSupport"],
            path: "Tests/QBlockTests"
        ),
        .testTarget(
            name: "QMachineTests",
            dependencies: ["QMachine", "QBlock", "TestSupport"],
            path: "Tests/QMachineTests"
        ),
    ],
    swiftLanguageModes: [.v6]
)
