import QBlockCore
import QBlockGraph
/// One image of a backing chain, as the library has it open.
public struct ImageLayer: Sendable, Hashable {
    /// The file (or NBD URI) the image was opened from.
    public var path: String
    /// The image's format.
    public var format: ImageFormat
    /// The size the guest sees, in bytes.
    public var virtualSize: Int64
    /// Whether the image refuses writes (backing images are read-only).
    public var isReadOnly: Bool
    /// Bytes per allocation unit (a qcow2 cluster); nil for formats without one.
    public var clusterSize: Int64?
    /// The backing file name recorded in the image, as written there (possibly relative to
    /// the image's directory); nil when it has none or its format cannot have one.
    public var backingFileName: String?

    /// The layer a driver shows; nil for a driver that is no image format.
    init?(_ node: any BlockDriver) {
        let inner = node.skippingFilters.innermostDriver
        guard let format = ImageFormat(rawValue: inner.driverName) else { return nil }
        self.path = inner.filename
        self.format = format
        self.virtualSize = inner.length
        self.isReadOnly = inner.isReadOnly
        self.clusterSize = inner.formatClusterSize.map(Int64.init)
        self.backingFileName = (inner as? any BackingLinked)?.backingFileName
    }
}

/// What an open image is: its format and size, and the chain of images below it
/// (`qemu-img info --backing-chain`, as typed values).
public struct ImageDescription: Sendable, Hashable {
    /// The image itself first, then its backing image, and so on down to the base.
    public var layers: [ImageLayer]

    /// The image itself (the top of the chain).
    public var top: ImageLayer { layers[0] }
    /// The top image's format.
    public var format: ImageFormat { top.format }
    /// The size the guest sees, in bytes.
    public var virtualSize: Int64 { top.virtualSize }
    /// The images below the top, nearest first (empty without a backing file).
    public var backingChain: ArraySlice<ImageLayer> { layers.dropFirst() }

    /// The chain of `node`, looking through filters at every step.
    /// - Throws: ``BlockError`` `.unsupported` if some node of the chain is no image format.
    init(_ node: any BlockDriver) throws(BlockError) {
        var layers: [ImageLayer] = []
        var cur: (any BlockDriver)? = node
        while let c = cur?.skippingFilters {
            guard let layer = ImageLayer(c) else {
                throw BlockError(.unsupported, "Node '\(c.filename)' (\(c.driverName)) is not an image format", operation: "info")
            }
            layers.append(layer)
            cur = c.backing
        }
        self.layers = layers
    }
}
