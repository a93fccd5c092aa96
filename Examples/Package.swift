// swift-tools-version: 6.1
// Programs that use QBlock the way another project would: a separate package that depends
// on QBlock by version. `make examples` (part of `make test`) tags the current commit in a
// scratch clone and points QBLOCK_PACKAGE_URL at it; a project of your own names the
// repository it gets QBlock from, e.g.
//     .package(url: "https://example.org/qblock.git", from: "1.0.0", traits: [])
// (`traits: []` turns off QBlock's default trait "Tools": swift-argument-parser, which only
// its command-line tools use, is then not even fetched.)
import PackageDescription

let qblockURL = Context.environment["QBLOCK_PACKAGE_URL"] ?? "https://example.org/qblock.git"
let qblockVersion = Version(stringLiteral: Context.environment["QBLOCK_PACKAGE_VERSION"] ?? "1.0.0")

let package = Package(
    name: "QBlockExamples",
    platforms: [.macOS(.v14)],
    dependencies: [
        .package(url: qblockURL, from: qblockVersion, traits: []),
    ],
    targets: [
        .executableTarget(
            name: "ReadWrite",
            dependencies: [.product(name: "QBlock", package: "qblock")],
            path: "Sources/ReadWrite"
        ),
        .executableTarget(
            name: "Chain",
            dependencies: [.product(name: "QBlock", package: "qblock")],
            path: "Sources/Chain"
        ),
        .executableTarget(
            name: "LiveSnapshotMirror",
            dependencies: [.product(name: "QBlock", package: "qblock")],
            path: "Sources/LiveSnapshotMirror"
        ),
        .executableTarget(
            name: "NBDRoundTrip",
            dependencies: [.product(name: "QBlock", package: "qblock")],
            path: "Sources/NBDRoundTrip"
        ),
    ]
)
