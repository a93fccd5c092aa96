/* x86_64-micro: the smallest guest. Each vCPU prints a line naming itself over the 16550
   UART (COM1, port 0x3f8), in vCPU order, then powers off (cli; hlt).
   Entered in 64-bit mode with RDI = vCPU index, RDX = number of vCPUs. vCPUs take turns
   through the `turn` word; vCPU 0 powers off last, which ends the machine's run. */
    .code64
    .section .text.start, "ax"
    .globl _start
_start:
    mov     %rdi, %rbx              /* vCPU index */
    mov     %rdx, %r12              /* vCPU count */
1:  cmp     turn(%rip), %ebx        /* wait for our turn */
    je      2f
    pause
    jmp     1b
2:  lea     msg(%rip), %rsi
    call    puts
    mov     %bl, %al
    add     $'0', %al
    call    putc
    mov     $'\n', %al
    call    putc
    lock incl turn(%rip)
    test    %rbx, %rbx
    jnz     off
3:  cmp     turn(%rip), %r12d       /* vCPU 0: wait for everyone */
    je      off
    pause
    jmp     3b
off:
    cli
    hlt                             /* HLT with IF clear: power-off */
    jmp     off

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
    lodsb
    test    %al, %al
    jz      1f
    call    putc
    jmp     puts
1:  ret

    .section .rodata
msg: .asciz "hello from x86_64-micro vCPU "

    .section .data
    .balign 4
turn: .long 0
