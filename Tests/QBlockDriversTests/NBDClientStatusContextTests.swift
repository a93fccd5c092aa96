import Testing
import QBlock
import TestSupport
@testable import QBlockCore
@testable import QBlockNBDWire
@testable import QBlockDrivers

/// The handshake with an `x-dirty-bitmap` context (``NBDClientHandshake/statusContext``):
/// one query for that context alone, and QEMU's refusals of other answers.
@Suite struct NBDClientStatusContextTests {
    typealias H = NBDClientHandshakeTests

    static func server(contexts: [(UInt32, String)]) -> [UInt8] {
        var s = H.greeting()
        s += H.reply(.structuredReply, .ack)
        for (id, name) in contexts { s += H.reply(.setMetaContext, .metaContext, H.metaContext(id, name)) }
        s += H.reply(.setMetaContext, .ack)
        s += H.reply(.go, .info, H.infoExport(size: 1 << 20, flags: [.hasFlags, .readOnly]))
        s += H.reply(.go, .ack)
        return s
    }

    @Test func asksForTheContextAloneAndReportsIt() throws {
        let ctx = "qemu:dirty-bitmap:b0"
        var hs = NBDClientHandshake(exportName: "e", statusContext: ctx)
        let (action, sent) = H.drive(&hs, Self.server(contexts: [(5, ctx)]))
        let info = try #require(H.expectDone(action))
        #expect(info.statusContext == ctx)
        #expect(info.statusContextID == 5)
        #expect(info.baseAllocationID == nil)
        var expected = NBDEncode.clientFlags([.fixedNewstyle, .noZeroes])
        expected += NBDEncode.optionRequest(.structuredReply)
        expected += NBDEncode.optionRequest(.setMetaContext, payload: NBDMetaContextRequest(exportName: "e", queries: [ctx]).encode())
        expected += NBDEncode.optionRequest(.go, payload: NBDInfoRequest(exportName: "e", requests: [NBD.Info.blockSize.rawValue]).encode())
        #expect(sent == expected)
    }

    @Test func aServerWithoutTheContextLeavesItUnset() throws {
        var hs = NBDClientHandshake(exportName: "", statusContext: "qemu:dirty-bitmap:nosuch")
        let (action, _) = H.drive(&hs, Self.server(contexts: []))
        let info = try #require(H.expectDone(action))
        #expect(info.statusContextID == nil)
    }

    @Test func anotherContextOrTwoAreRefusedInQemusWords() throws {
        var hs = NBDClientHandshake(exportName: "", statusContext: "qemu:dirty-bitmap:b0")
        let e = try #require(H.expectFailed(H.drive(&hs, Self.server(contexts: [(1, "base:allocation")])).0))
        #expect(e.message == "Failed to negotiate meta context 'qemu:dirty-bitmap:b0', server answered with different context 'base:allocation'")
        var hs2 = NBDClientHandshake(exportName: "", statusContext: "qemu:dirty-bitmap:b0")
        let e2 = try #require(H.expectFailed(H.drive(&hs2, Self.server(contexts: [(1, "qemu:dirty-bitmap:b0"), (2, "qemu:dirty-bitmap:b0")])).0))
        #expect(e2.message == "Server answered with more than one context")
    }
}
