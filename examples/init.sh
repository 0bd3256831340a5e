#!/bin/sh
# Runs once at first boot (cloud-init user-data).
echo "hello from $(hostname)" > /etc/motd
