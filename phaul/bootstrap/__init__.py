"""Bootstrap of new hosts over SSH (`phaul host add/remove`): `ssh` is one verified SSH
session (paramiko), `hostadd` the procedure that turns a bare host into a peer."""
