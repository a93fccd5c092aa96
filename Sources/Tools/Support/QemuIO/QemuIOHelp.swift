import QBlock
/// Extended help (`help CMD`) for the commands that have it.
enum QemuIOHelp {
    static let read = """

     reads a range of bytes from the given offset

     Example:
     'read -v 512 1k' - dumps 1 kilobyte read from 512 bytes into the file

     Options:
     -b, -- read from the VM state (not supported: fails with ENOTSUP)
     -C, -- report statistics in a machine parsable format
     -l, -- length for pattern verification (only with -P)
     -p, -- ignored for backwards compatibility
     -P, -- use a pattern to verify read data
     -q, -- quiet mode, do not show I/O statistics
     -s, -- start offset for pattern verification (only with -P)
     -v, -- dump buffer to standard output


    """
    static let readv = """

     reads a range of bytes from the given offset into multiple buffers

     Example:
     'readv -v 512 1k 1k ' - dumps 2 kilobytes read from 512 bytes into the file

     -C, -- report statistics in a machine parsable format
     -P, -- use a pattern to verify read data
     -v, -- dump buffer to standard output
     -q, -- quiet mode, do not show I/O statistics


    """
    static let write = """

     writes a range of bytes from the given offset

     Example:
     'write 512 1k' - writes 1 kilobyte at 512 bytes into the open file

     The buffer is filled with a pattern (0xcd by default).
     -b, -- write to the VM state (not supported: fails with ENOTSUP)
     -c, -- write compressed data (fails with ENOTSUP unless the format supports it)
     -f, -- use Force Unit Access semantics
     -n, -- with -z, don't allow slow fallback
     -p, -- ignored for backwards compatibility
     -P, -- use different pattern to fill file
     -s, -- use a pattern file to fill the write buffer
     -C, -- report statistics in a machine parsable format
     -q, -- quiet mode, do not show I/O statistics
     -u, -- with -z, allow unmapping
     -z, -- write zeroes


    """
    static let writev = """

     writes a range of bytes from the given offset from multiple buffers

     Example:
     'writev 512 1k 1k' - writes 2 kilobytes at 512 bytes into the open file

     -P, -- use different pattern to fill file
     -C, -- report statistics in a machine parsable format
     -f, -- use Force Unit Access semantics
     -q, -- quiet mode, do not show I/O statistics


    """
    static let aioRead = """

     asynchronously reads a range of bytes from the given offset

     The read runs in the background; aio_flush waits for all outstanding requests.
     The command succeeds once the request is submitted, whatever its outcome.
     -C, -- report statistics in a machine parsable format
     -P, -- use a pattern to verify read data
     -i, -- treat request as invalid
     -v, -- dump buffer to standard output
     -q, -- quiet mode, do not show I/O statistics


    """
    static let aioWrite = """

     asynchronously writes a range of bytes from the given offset

     The write runs in the background; aio_flush waits for all outstanding requests.
     The command succeeds once the request is submitted, whatever its outcome.
     -P, -- use different pattern to fill file
     -C, -- report statistics in a machine parsable format
     -f, -- use Force Unit Access semantics
     -i, -- treat request as invalid
     -q, -- quiet mode, do not show I/O statistics
     -u, -- with -z, allow unmapping
     -z, -- write zeroes


    """
    static let discard = """

     discards a range of bytes from the given offset

     Example:
     'discard 512 1k' - discards 1 kilobyte from 512 bytes into the file

     -C, -- report statistics in a machine parsable format
     -q, -- quiet mode, do not show I/O statistics


    """
    static let open = """

     opens a new file in the requested mode

     Example:
     'open -n -o driver=raw /tmp/data' - opens raw data file read-write, uncached

     -r, -- open file read-only
     -s, -- use snapshot file
     -C, -- use copy-on-read
     -n, -- disable host cache, short for -t none
     -U, -- force shared permissions
     -k, -- use kernel AIO implementation (Linux only, prefer use of -i)
     -i, -- use AIO mode (threads, native or io_uring)
     -t, -- use the given cache mode for the image
     -d, -- use the given discard mode for the image
     -f, -- the image format (same as -o driver=FMT)
     -o, -- options to be given to the block driver


    """
    static let reopen = """

     Changes the open options of an already opened image

     Example:
     'reopen -r' - makes the image read-only

     -r, -- Reopen the image read-only
     -w, -- Reopen the image read-write
     -c, -- Change the cache mode to the given value
     -o, -- Changes block driver options (cf. 'open' command)


    """
    static let sigraise = """

     raises the given signal

     Example:
     'sigraise 15' - raises SIGTERM

     Invokes raise(signal), where "signal" is the mandatory integer argument
     given to sigraise.


    """
}
