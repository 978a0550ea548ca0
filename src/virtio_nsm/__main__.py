from virtio_nsm.cli import main

main()
