/* x86_64-micro: drives a virtio-blk device through its virtio-mmio registers (Virtio 1.2
   section 4.2.2, split virtqueue section 2.7) and reports over the 16550 UART on COM1.

     1. finds the first virtio-mmio slot with magic "virt", version 2, device ID 2 (block)
     2. negotiates VERSION_1 and FLUSH, sets up queue 0 (8 descriptors) in guest RAM
     3. reads sector 0 and prints its FNV-1a 32-bit checksum
     4. writes sectors 1..8, sector k filled with the byte 0xa0+k, flushes,
        reads them back and compares
     5. prints "... OK" or "FAIL <why>", then powers off (cli; hlt)

   No interrupts: every request is published, notified, then the used ring is polled.
   Entered in 64-bit mode (X86MicroMachine): RDI = vCPU index (others than 0 power off at
   once), identity-mapped memory, RSP set. Only vCPU 0 touches the device. */

    .code64

    /* virtio-mmio registers */
    .set MAGIC,        0x000
    .set VERSION,      0x004
    .set DEVICEID,     0x008
    .set DEVFEAT,      0x010
    .set DEVFEATSEL,   0x014
    .set DRVFEAT,      0x020
    .set DRVFEATSEL,   0x024
    .set QUEUESEL,     0x030
    .set QUEUENUMMAX,  0x034
    .set QUEUENUM,     0x038
    .set QUEUEREADY,   0x044
    .set QUEUENOTIFY,  0x050
    .set STATUS,       0x070
    .set QDESCLO,      0x080
    .set QDESCHI,      0x084
    .set QDRIVERLO,    0x090
    .set QDRIVERHI,    0x094
    .set QDEVICELO,    0x0a0
    .set QDEVICEHI,    0x0a4
    .set CONFIG,       0x100      /* virtio_blk_config: capacity u64 first */

    /* device status bits */
    .set S_ACK,        1
    .set S_DRIVER,     2
    .set S_DRIVER_OK,  4
    .set S_FEATURES_OK, 8
    .set S_NEEDS_RESET, 0x40

    .set F_FLUSH,      (1 << 9)   /* VIRTIO_BLK_F_FLUSH, low word */
    .set F_VERSION_1,  1          /* bit 32: bit 0 of the high word */

    /* request types, descriptor flags */
    .set T_IN,         0
    .set T_OUT,        1
    .set T_FLUSH,      4
    .set D_NEXT,       1
    .set D_WRITE,      2

    .set VIRTIO_BASE,  0xd0000000
    .set SLOTS,        8
    .set QSIZE,        8

    /* guest RAM used (above the firmware, zero at boot) */
    .set QDESC,        0x200000   /* 8 descriptors of 16 bytes */
    .set QAVAIL,       0x201000   /* flags u16, idx u16, ring[8] u16 */
    .set QUSED,        0x202000   /* flags u16, idx u16, ring[8] {id u32, len u32} */
    .set REQHDR,       0x203000   /* type u32, reserved u32, sector u64 */
    .set REQSTS,       0x203100   /* status u8 */
    .set BUF,          0x204000   /* what is written */
    .set RBUF,         0x206000   /* what is read back */

    .set FIRST,        1          /* first sector written */
    .set NSECT,        8          /* sectors written */

    .section .text.start, "ax"
    .globl _start
_start:
    test    %rdi, %rdi
    jnz     poweroff
    lea     m_banner(%rip), %rsi
    call    puts

    /* 1. find the device */
    mov     $VIRTIO_BASE, %r15d
    mov     $SLOTS, %ecx
find:
    cmpl    $0x74726976, MAGIC(%r15)
    jne     next
    cmpl    $2, VERSION(%r15)
    jne     next
    cmpl    $2, DEVICEID(%r15)
    je      found
next:
    add     $0x1000, %r15
    loop    find
    lea     f_nodev(%rip), %rsi
    jmp     fail
found:
    lea     m_found(%rip), %rsi
    call    puts
    mov     %r15d, %edi
    call    puthex32

    /* 2. reset, ACK, DRIVER, features */
    movl    $0, STATUS(%r15)
    movl    $S_ACK, STATUS(%r15)
    movl    $(S_ACK | S_DRIVER), STATUS(%r15)
    movl    $1, DEVFEATSEL(%r15)
    mov     DEVFEAT(%r15), %eax
    lea     f_version(%rip), %rsi
    test    $F_VERSION_1, %eax
    jz      fail
    movl    $0, DEVFEATSEL(%r15)
    mov     DEVFEAT(%r15), %eax
    lea     f_flush(%rip), %rsi
    test    $F_FLUSH, %eax
    jz      fail
    movl    $0, DRVFEATSEL(%r15)
    movl    $F_FLUSH, DRVFEAT(%r15)
    movl    $1, DRVFEATSEL(%r15)
    movl    $F_VERSION_1, DRVFEAT(%r15)
    movl    $(S_ACK | S_DRIVER | S_FEATURES_OK), STATUS(%r15)
    mov     STATUS(%r15), %eax
    lea     f_features(%rip), %rsi
    test    $S_FEATURES_OK, %eax
    jz      fail

    /* queue 0 */
    movl    $0, QUEUESEL(%r15)
    lea     f_queue(%rip), %rsi
    cmpl    $QSIZE, QUEUENUMMAX(%r15)
    jb      fail
    cmpl    $0, QUEUEREADY(%r15)
    jne     fail
    movl    $QSIZE, QUEUENUM(%r15)
    movl    $QDESC, QDESCLO(%r15)
    movl    $0, QDESCHI(%r15)
    movl    $QAVAIL, QDRIVERLO(%r15)
    movl    $0, QDRIVERHI(%r15)
    movl    $QUSED, QDEVICELO(%r15)
    movl    $0, QDEVICEHI(%r15)
    movl    $1, QUEUEREADY(%r15)
    movl    $(S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK), STATUS(%r15)
    mov     STATUS(%r15), %eax
    lea     f_reset(%rip), %rsi
    test    $S_NEEDS_RESET, %eax
    jnz     fail

    /* capacity, in sectors */
    mov     CONFIG(%r15), %eax
    mov     (CONFIG + 4)(%r15), %edx
    shl     $32, %rdx
    or      %rdx, %rax
    lea     f_small(%rip), %rsi
    cmp     $(FIRST + NSECT), %rax
    jb      fail
    push    %rax
    lea     m_capacity(%rip), %rsi
    call    puts
    pop     %rdi
    call    puthex32
    lea     m_sectors(%rip), %rsi
    call    puts

    /* 3. sector 0 and its checksum */
    mov     $T_IN, %edi
    xor     %esi, %esi
    mov     $BUF, %edx
    mov     $512, %ecx
    call    request
    lea     f_read0(%rip), %rsi
    test    %eax, %eax
    jnz     fail
    mov     $BUF, %esi
    mov     $512, %ecx
    call    fnv1a
    push    %rax
    lea     m_sum(%rip), %rsi
    call    puts
    pop     %rdi
    call    puthex32
    mov     $'\n', %al
    call    putc

    /* 4. the pattern: sector FIRST+k-1 (k = 1..NSECT) all bytes 0xa0+k */
    mov     $BUF, %edi
    mov     $1, %ebx
fill:
    lea     0xa0(%rbx), %eax
    mov     $512, %ecx
    rep stosb
    inc     %ebx
    cmp     $NSECT, %ebx
    jbe     fill

    mov     $T_OUT, %edi
    mov     $FIRST, %esi
    mov     $BUF, %edx
    mov     $(NSECT * 512), %ecx
    call    request
    lea     f_write(%rip), %rsi
    test    %eax, %eax
    jnz     fail

    mov     $T_FLUSH, %edi
    xor     %esi, %esi
    xor     %edx, %edx
    xor     %ecx, %ecx
    call    request
    lea     f_flushreq(%rip), %rsi
    test    %eax, %eax
    jnz     fail

    mov     $RBUF, %edi             /* poison the read-back buffer */
    mov     $0xee, %al
    mov     $(NSECT * 512), %ecx
    rep stosb
    mov     $T_IN, %edi
    mov     $FIRST, %esi
    mov     $RBUF, %edx
    mov     $(NSECT * 512), %ecx
    call    request
    lea     f_readback(%rip), %rsi
    test    %eax, %eax
    jnz     fail

    mov     $BUF, %esi
    mov     $RBUF, %edi
    mov     $(NSECT * 512), %ecx
    repe cmpsb
    jne     mismatch

    /* 5. done */
    lea     m_ok(%rip), %rsi
    call    puts
    movl    $0, STATUS(%r15)        /* reset the device: it stops using the queue */
poweroff:
    cli
    hlt                             /* HLT with IF clear: power-off */
    jmp     poweroff

mismatch:
    lea     -(BUF + 1)(%rsi), %rbx  /* offset of the first differing byte */
    lea     f_compare(%rip), %rsi
    call    puts
    mov     %ebx, %edi
    call    puthex32
    mov     $'\n', %al
    call    putc
    jmp     poweroff

/* fail: prints "FAIL " and the string at RSI, powers off. */
fail:
    push    %rsi
    lea     m_fail(%rip), %rsi
    call    puts
    pop     %rsi
    call    puts
    jmp     poweroff

/* request: one virtio-blk request, waited for by polling the used ring.
   EDI = type, RSI = sector, RDX = buffer, ECX = length (0: no data descriptor).
   Returns the status byte in EAX (0 = OK; 0xff = the device never wrote it).
   Always uses descriptor chain 0 -> [1 ->] 2, head 0: one request at a time. */
request:
    mov     %edi, REQHDR
    movl    $0, (REQHDR + 4)
    mov     %rsi, (REQHDR + 8)
    movb    $0xff, REQSTS
    movq    $REQHDR, QDESC
    movl    $16, (QDESC + 8)
    movw    $D_NEXT, (QDESC + 12)
    movw    $1, (QDESC + 14)
    test    %ecx, %ecx
    jz      1f
    mov     %rdx, (QDESC + 16)
    mov     %ecx, (QDESC + 24)
    mov     $D_NEXT, %eax
    cmp     $T_IN, %edi
    jne     2f
    or      $D_WRITE, %eax          /* the device writes what it reads from disk */
2:  mov     %ax, (QDESC + 28)
    movw    $2, (QDESC + 30)
    jmp     3f
1:  movw    $2, (QDESC + 14)        /* no data: header straight to status */
3:  movq    $REQSTS, (QDESC + 32)
    movl    $1, (QDESC + 40)
    movw    $D_WRITE, (QDESC + 44)
    movw    $0, (QDESC + 46)
    /* publish head 0 in the avail ring, then the new index (x86 keeps stores in order) */
    movzwl  (QAVAIL + 2), %eax
    mov     %eax, %r8d
    and     $(QSIZE - 1), %r8d
    movw    $0, (QAVAIL + 4)(,%r8,2)
    inc     %eax
    mfence
    mov     %ax, (QAVAIL + 2)
    mfence
    movl    $0, QUEUENOTIFY(%r15)
4:  cmp     %ax, (QUSED + 2)        /* wait until the device used it */
    je      5f
    testl   $S_NEEDS_RESET, STATUS(%r15)
    jnz     6f
    pause
    jmp     4b
5:  movzbl  REQSTS, %eax
    ret
6:  lea     f_reset(%rip), %rsi
    jmp     fail

/* fnv1a: FNV-1a 32 over ECX bytes at RSI, in EAX. */
fnv1a:
    mov     $0x811c9dc5, %eax
1:  movzbl  (%rsi), %edx
    xor     %edx, %eax
    imul    $0x01000193, %eax, %eax
    inc     %rsi
    dec     %ecx
    jnz     1b
    ret

/* puthex32: EDI as 8 hex digits. */
puthex32:
    push    %rbx
    mov     %edi, %ebx
    mov     $8, %ecx
1:  rol     $4, %ebx
    mov     %ebx, %eax
    and     $0xf, %eax
    lea     hexdigits(%rip), %rdx
    movb    (%rdx,%rax), %al
    push    %rcx
    call    putc
    pop     %rcx
    loop    1b
    pop     %rbx
    ret

/* putc: AL to the UART once its transmit holding register is empty (LSR bit 5). */
putc:
    push    %rax
    mov     $0x3fd, %dx
1:  in      %dx, %al
    test    $0x20, %al
    jz      1b
    pop     %rax
    mov     $0x3f8, %dx
    out     %al, %dx
    ret

/* puts: the NUL-terminated string at RSI. */
puts:
    push    %rax
1:  lodsb
    test    %al, %al
    jz      2f
    call    putc
    jmp     1b
2:  pop     %rax
    ret

    .section .rodata
hexdigits:  .ascii "0123456789abcdef"
m_banner:   .asciz "x86_64-micro virtio-blk test\n"
m_found:    .asciz "virtio-blk at 0x"
m_capacity: .asciz "\ncapacity 0x"
m_sectors:  .asciz " sectors\n"
m_sum:      .asciz "sector 0 fnv1a "
m_ok:       .asciz "wrote sectors 1-8, flushed, read back: OK\n"
m_fail:     .asciz "FAIL "
f_nodev:    .asciz "no virtio-blk device\n"
f_version:  .asciz "device does not offer VERSION_1\n"
f_flush:    .asciz "device does not offer FLUSH\n"
f_features: .asciz "device refused the features\n"
f_queue:    .asciz "queue 0 unusable\n"
f_reset:    .asciz "device needs reset\n"
f_small:    .asciz "disk smaller than 9 sectors\n"
f_read0:    .asciz "reading sector 0\n"
f_write:    .asciz "writing sectors 1-8\n"
f_flushreq: .asciz "flush\n"
f_readback: .asciz "reading sectors 1-8 back\n"
f_compare:  .asciz "read-back differs at byte 0x"
