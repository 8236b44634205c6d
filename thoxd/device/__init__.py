"""What the box is: its hardware and identity for /system/info, its network interfaces, mDNS
discovery, and systemd notify/watchdog."""
