/* x86_64-micro: a guest that crashes. There is no IDT (limit 0), so the #UD raised by
   ud2 cannot be delivered, nor the #DF that follows: a triple fault, which KVM reports
   as KVM_EXIT_SHUTDOWN and the machine as a crash naming RIP. */
    .code64
    .section .text.start, "ax"
    .globl _start
_start:
    lea     msg(%rip), %rsi
    mov     $0x3f8, %dx
1:  lodsb
    test    %al, %al
    jz      2f
    out     %al, %dx
    jmp     1b
2:  ud2
    .section .rodata
msg: .asciz "about to fault\n"
