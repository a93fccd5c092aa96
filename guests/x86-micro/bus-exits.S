/* x86_64-micro: exercises the exits the KVM vCPU dispatches to its buses.
     port 0x80:   out of 1, 2 and 4 bytes
     port 0x84:   in of 4 bytes (the test's device answers 0x11223344)
     port 0x90:   in of 1 byte from an unmapped port (reads 0xff)
     port 0x3f8:  rep outsb of "rep\n" (4 exits' worth of data in one or more exits)
     0xd0000000:  MMIO write of 8 bytes, then a read of 8 bytes
     0xd0001000:  MMIO read of 4 bytes from an unmapped address (reads 0)
   Results land in registers the test reads after power-off:
     RBX = the port 0x84 value, RCX = the unmapped port byte, R8 = the MMIO value,
     R9 = the unmapped MMIO value. */
    .code64
    .section .text.start, "ax"
    .globl _start
_start:
    mov     $0x80, %dx
    mov     $0xa1, %al
    out     %al, %dx
    mov     $0xb2c3, %ax
    out     %ax, %dx
    mov     $0xd4e5f607, %eax
    out     %eax, %dx
    mov     $0x84, %dx
    in      %dx, %eax
    mov     %eax, %ebx
    mov     $0x3f8, %dx
    lea     msg(%rip), %rsi
    mov     $4, %ecx
    rep outsb
    mov     $0xd0000000, %edi
    mov     $0x0102030405060708, %rax
    mov     %rax, (%rdi)
    mov     (%rdi), %r8
    mov     0x1000(%rdi), %r9d
    mov     $0x90, %dx              /* unmapped port */
    in      %dx, %al
    movzbl  %al, %ecx
    cli
    hlt
    .section .rodata
msg: .ascii "rep\n"
