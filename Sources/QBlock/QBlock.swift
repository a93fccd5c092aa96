// `import QBlock` gives a program the whole public API; each layer is its own target
// (docs/architecture.md), and a program may import a single layer instead.
@_exported import QBlockCore
@_exported import QBlockNBDWire
@_exported import QBlockBitmaps
@_exported import QBlockGraph
@_exported import QBlockDrivers
@_exported import QBlockOpen
@_exported import QBlockOperations
@_exported import QBlockJobs
@_exported import QBlockNBDServer
@_exported import QBlockAPI
@_exported import QBlockMonitor
