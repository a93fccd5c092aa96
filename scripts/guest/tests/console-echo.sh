# Guest test: reads a line typed on the serial console (the UART's receive path and its
# interrupt, through the tty layer) and prints it back. (No `read -t`: its timeout reads
# the clock through the vDSO's rdtime, which the hart refuses in U-mode while the kernel
# leaves scounteren.TM clear; see docs/machine.md.)
echo "guest: type a line"
if read line; then echo "guest: got <$line>"; else echo "guest: no input"; fi
