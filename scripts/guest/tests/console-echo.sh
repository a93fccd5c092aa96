# Guest test: reads a line typed on the serial console (the UART's receive path and its
# interrupt, through the tty layer) and prints it back. No timeout: the host's test kills
# the machine if the line never arrives.
echo "guest: type a line"
if read line; then echo "guest: got <$line>"; else echo "guest: no input"; fi
