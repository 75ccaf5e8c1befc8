"""The cffi declarations of kvmvfio: Linux 6.12 uAPI, header by header.

Each block below is the part of one kernel header kvmvfio uses, copied in the
header's own order with the same struct names, field names, field order and
field types. Where cffi's C parser needs it the text differs, and only so:

- ``#define`` values are integer literals: cffi accepts nothing else, so
  ``(1 << 2)`` is written ``4``, ``(';')`` is ``0x3B`` and an alias names the
  number it stands for (the original is in a comment).
- ``#define NAME NAME`` lines (the kernel's way to let C code ``#ifdef`` an
  enumerator) are left out; the enumerator is declared.
- ``__aligned_u64`` is ``__u64 __attribute__((aligned(8)))``; cffi knows no
  attributes, so it is a plain 64-bit type here. That is the same layout on
  every 64-bit Linux ABI kvmvfio runs on (x86_64, arm64), where ``__u64`` is
  8-byte aligned already.
- Doc comments are left out; read the header.

``tests/unit/test_uapi_headers.py`` compiles a C program against the real
6.12 headers and compares every ioctl number, struct size, field offset and
constant declared here, so a mistake in this file fails a test instead of
corrupting a kernel call.
"""

from __future__ import annotations

#: The kernel release the declarations mirror.
KERNEL_RELEASE = "6.12"

# include/uapi/asm-generic/int-ll64.h (through linux/types.h)
TYPES = """
typedef uint8_t __u8;
typedef int8_t __s8;
typedef uint16_t __u16;
typedef int16_t __s16;
typedef uint32_t __u32;
typedef int32_t __s32;
typedef uint64_t __u64;
typedef int64_t __s64;
typedef uint64_t __aligned_u64;   /* __u64 __attribute__((aligned(8))) */
"""

# include/uapi/linux/vfio.h
VFIO_H = """
#define VFIO_API_VERSION	0

#define VFIO_TYPE1_IOMMU		1
#define VFIO_SPAPR_TCE_IOMMU		2
#define VFIO_TYPE1v2_IOMMU		3
#define VFIO_DMA_CC_IOMMU		4
#define VFIO_EEH			5
#define VFIO_TYPE1_NESTING_IOMMU	6	/* Implies v2 */
#define VFIO_SPAPR_TCE_v2_IOMMU		7
#define VFIO_NOIOMMU_IOMMU		8
#define VFIO_UNMAP_ALL			9
#define VFIO_UPDATE_VADDR		10

#define VFIO_TYPE	0x3B	/* (';') */
#define VFIO_BASE	100

struct vfio_info_cap_header {
	__u16	id;		/* Identifies capability */
	__u16	version;	/* Version specific to the capability ID */
	__u32	next;		/* Offset of next capability */
};

struct vfio_group_status {
	__u32	argsz;
	__u32	flags;
#define VFIO_GROUP_FLAGS_VIABLE		1	/* (1 << 0) */
#define VFIO_GROUP_FLAGS_CONTAINER_SET	2	/* (1 << 1) */
};

struct vfio_device_info {
	__u32	argsz;
	__u32	flags;
#define VFIO_DEVICE_FLAGS_RESET	1	/* (1 << 0) Device supports reset */
#define VFIO_DEVICE_FLAGS_PCI	2	/* (1 << 1) vfio-pci device */
#define VFIO_DEVICE_FLAGS_PLATFORM 4	/* (1 << 2) vfio-platform device */
#define VFIO_DEVICE_FLAGS_AMBA  8	/* (1 << 3) vfio-amba device */
#define VFIO_DEVICE_FLAGS_CCW	16	/* (1 << 4) vfio-ccw device */
#define VFIO_DEVICE_FLAGS_AP	32	/* (1 << 5) vfio-ap device */
#define VFIO_DEVICE_FLAGS_FSL_MC 64	/* (1 << 6) vfio-fsl-mc device */
#define VFIO_DEVICE_FLAGS_CAPS	128	/* (1 << 7) Info supports caps */
#define VFIO_DEVICE_FLAGS_CDX	256	/* (1 << 8) vfio-cdx device */
	__u32	num_regions;	/* Max region index + 1 */
	__u32	num_irqs;	/* Max IRQ index + 1 */
	__u32   cap_offset;	/* Offset within info struct of first cap */
	__u32   pad;
};

struct vfio_region_info {
	__u32	argsz;
	__u32	flags;
#define VFIO_REGION_INFO_FLAG_READ	1	/* (1 << 0) Region supports read */
#define VFIO_REGION_INFO_FLAG_WRITE	2	/* (1 << 1) Region supports write */
#define VFIO_REGION_INFO_FLAG_MMAP	4	/* (1 << 2) Region supports mmap */
#define VFIO_REGION_INFO_FLAG_CAPS	8	/* (1 << 3) Info supports caps */
	__u32	index;		/* Region index */
	__u32	cap_offset;	/* Offset within info struct of first cap */
	__aligned_u64	size;	/* Region size (bytes) */
	__aligned_u64	offset;	/* Region offset from start of device fd */
};

#define VFIO_REGION_INFO_CAP_SPARSE_MMAP	1

struct vfio_region_sparse_mmap_area {
	__aligned_u64	offset;	/* Offset of mmap'able area within region */
	__aligned_u64	size;	/* Size of mmap'able area */
};

struct vfio_region_info_cap_sparse_mmap {
	struct vfio_info_cap_header header;
	__u32	nr_areas;
	__u32	reserved;
	struct vfio_region_sparse_mmap_area areas[];
};

#define VFIO_REGION_INFO_CAP_TYPE	2

struct vfio_region_info_cap_type {
	struct vfio_info_cap_header header;
	__u32 type;	/* global per bus driver */
	__u32 subtype;	/* type specific */
};

#define VFIO_REGION_INFO_CAP_MSIX_MAPPABLE	3

struct vfio_irq_info {
	__u32	argsz;
	__u32	flags;
#define VFIO_IRQ_INFO_EVENTFD		1	/* (1 << 0) */
#define VFIO_IRQ_INFO_MASKABLE		2	/* (1 << 1) */
#define VFIO_IRQ_INFO_AUTOMASKED	4	/* (1 << 2) */
#define VFIO_IRQ_INFO_NORESIZE		8	/* (1 << 3) */
	__u32	index;		/* IRQ index */
	__u32	count;		/* Number of IRQs within this index */
};

struct vfio_irq_set {
	__u32	argsz;
	__u32	flags;
#define VFIO_IRQ_SET_DATA_NONE		1	/* (1 << 0) Data not present */
#define VFIO_IRQ_SET_DATA_BOOL		2	/* (1 << 1) Data is bool (u8) */
#define VFIO_IRQ_SET_DATA_EVENTFD	4	/* (1 << 2) Data is eventfd (s32) */
#define VFIO_IRQ_SET_ACTION_MASK	8	/* (1 << 3) Mask interrupt */
#define VFIO_IRQ_SET_ACTION_UNMASK	16	/* (1 << 4) Unmask interrupt */
#define VFIO_IRQ_SET_ACTION_TRIGGER	32	/* (1 << 5) Trigger interrupt */
	__u32	index;
	__u32	start;
	__u32	count;
	__u8	data[];
};

#define VFIO_IRQ_SET_DATA_TYPE_MASK	7	/* NONE | BOOL | EVENTFD */
#define VFIO_IRQ_SET_ACTION_TYPE_MASK	56	/* MASK | UNMASK | TRIGGER */

enum {
	VFIO_PCI_BAR0_REGION_INDEX,
	VFIO_PCI_BAR1_REGION_INDEX,
	VFIO_PCI_BAR2_REGION_INDEX,
	VFIO_PCI_BAR3_REGION_INDEX,
	VFIO_PCI_BAR4_REGION_INDEX,
	VFIO_PCI_BAR5_REGION_INDEX,
	VFIO_PCI_ROM_REGION_INDEX,
	VFIO_PCI_CONFIG_REGION_INDEX,
	VFIO_PCI_VGA_REGION_INDEX,
	VFIO_PCI_NUM_REGIONS = 9 /* Fixed user ABI, region indexes >=9 use */
				/* device specific cap to define content. */
};

enum {
	VFIO_PCI_INTX_IRQ_INDEX,
	VFIO_PCI_MSI_IRQ_INDEX,
	VFIO_PCI_MSIX_IRQ_INDEX,
	VFIO_PCI_ERR_IRQ_INDEX,
	VFIO_PCI_REQ_IRQ_INDEX,
	VFIO_PCI_NUM_IRQS
};

struct vfio_pci_dependent_device {
	union {
		__u32   group_id;
		__u32	devid;
#define VFIO_PCI_DEVID_OWNED		0
#define VFIO_PCI_DEVID_NOT_OWNED	-1
	};
	__u16	segment;
	__u8	bus;
	__u8	devfn; /* Use PCI_SLOT/PCI_FUNC */
};

struct vfio_pci_hot_reset_info {
	__u32	argsz;
	__u32	flags;
#define VFIO_PCI_HOT_RESET_FLAG_DEV_ID		1	/* (1 << 0) */
#define VFIO_PCI_HOT_RESET_FLAG_DEV_ID_OWNED	2	/* (1 << 1) */
	__u32	count;
	struct vfio_pci_dependent_device	devices[];
};

struct vfio_pci_hot_reset {
	__u32	argsz;
	__u32	flags;
	__u32	count;
	__s32	group_fds[];
};

struct vfio_device_feature {
	__u32	argsz;
	__u32	flags;
#define VFIO_DEVICE_FEATURE_MASK	65535	/* (0xffff) */
#define VFIO_DEVICE_FEATURE_GET		65536	/* (1 << 16) */
#define VFIO_DEVICE_FEATURE_SET		131072	/* (1 << 17) */
#define VFIO_DEVICE_FEATURE_PROBE	262144	/* (1 << 18) */
	__u8	data[];
};

#define VFIO_DEVICE_FEATURE_PCI_VF_TOKEN	0

struct vfio_device_bind_iommufd {
	__u32		argsz;
	__u32		flags;
	__s32		iommufd;
	__u32		out_devid;
};

struct vfio_device_attach_iommufd_pt {
	__u32	argsz;
	__u32	flags;
	__u32	pt_id;
};

struct vfio_device_detach_iommufd_pt {
	__u32	argsz;
	__u32	flags;
};

struct vfio_iommu_type1_info {
	__u32	argsz;
	__u32	flags;
#define VFIO_IOMMU_INFO_PGSIZES 1	/* (1 << 0) supported page sizes info */
#define VFIO_IOMMU_INFO_CAPS	2	/* (1 << 1) Info supports caps */
	__aligned_u64	iova_pgsizes;		/* Bitmap of supported page sizes */
	__u32   cap_offset;	/* Offset within info struct of first cap */
	__u32   pad;
};

#define VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE  1

struct vfio_iova_range {
	__u64	start;
	__u64	end;
};

struct vfio_iommu_type1_info_cap_iova_range {
	struct	vfio_info_cap_header header;
	__u32	nr_iovas;
	__u32	reserved;
	struct	vfio_iova_range iova_ranges[];
};

struct vfio_iommu_type1_dma_map {
	__u32	argsz;
	__u32	flags;
#define VFIO_DMA_MAP_FLAG_READ 1	/* (1 << 0) readable from device */
#define VFIO_DMA_MAP_FLAG_WRITE 2	/* (1 << 1) writable from device */
#define VFIO_DMA_MAP_FLAG_VADDR 4	/* (1 << 2) */
	__u64	vaddr;				/* Process virtual address */
	__u64	iova;				/* IO virtual address */
	__u64	size;				/* Size of mapping (bytes) */
};

struct vfio_iommu_type1_dma_unmap {
	__u32	argsz;
	__u32	flags;
#define VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP 1	/* (1 << 0) */
#define VFIO_DMA_UNMAP_FLAG_ALL		     2	/* (1 << 1) */
#define VFIO_DMA_UNMAP_FLAG_VADDR	     4	/* (1 << 2) */
	__u64	iova;				/* IO virtual address */
	__u64	size;				/* Size of mapping (bytes) */
	__u8    data[];
};
"""

# include/uapi/linux/iommufd.h
IOMMUFD_H = """
#define IOMMUFD_TYPE 0x3B	/* (';') */

enum {
	IOMMUFD_CMD_BASE = 0x80,
	IOMMUFD_CMD_DESTROY = IOMMUFD_CMD_BASE,
	IOMMUFD_CMD_IOAS_ALLOC = 0x81,
	IOMMUFD_CMD_IOAS_ALLOW_IOVAS = 0x82,
	IOMMUFD_CMD_IOAS_COPY = 0x83,
	IOMMUFD_CMD_IOAS_IOVA_RANGES = 0x84,
	IOMMUFD_CMD_IOAS_MAP = 0x85,
	IOMMUFD_CMD_IOAS_UNMAP = 0x86,
	IOMMUFD_CMD_OPTION = 0x87,
	IOMMUFD_CMD_VFIO_IOAS = 0x88,
	IOMMUFD_CMD_HWPT_ALLOC = 0x89,
	IOMMUFD_CMD_GET_HW_INFO = 0x8a,
	IOMMUFD_CMD_HWPT_SET_DIRTY_TRACKING = 0x8b,
	IOMMUFD_CMD_HWPT_GET_DIRTY_BITMAP = 0x8c,
	IOMMUFD_CMD_HWPT_INVALIDATE = 0x8d,
	IOMMUFD_CMD_FAULT_QUEUE_ALLOC = 0x8e,
};

struct iommu_destroy {
	__u32 size;
	__u32 id;
};

struct iommu_ioas_alloc {
	__u32 size;
	__u32 flags;
	__u32 out_ioas_id;
};

struct iommu_iova_range {
	__aligned_u64 start;
	__aligned_u64 last;
};

struct iommu_ioas_iova_ranges {
	__u32 size;
	__u32 ioas_id;
	__u32 num_iovas;
	__u32 __reserved;
	__aligned_u64 allowed_iovas;
	__aligned_u64 out_iova_alignment;
};

struct iommu_ioas_allow_iovas {
	__u32 size;
	__u32 ioas_id;
	__u32 num_iovas;
	__u32 __reserved;
	__aligned_u64 allowed_iovas;
};

enum iommufd_ioas_map_flags {
	IOMMU_IOAS_MAP_FIXED_IOVA = 1 << 0,
	IOMMU_IOAS_MAP_WRITEABLE = 1 << 1,
	IOMMU_IOAS_MAP_READABLE = 1 << 2,
};

struct iommu_ioas_map {
	__u32 size;
	__u32 flags;
	__u32 ioas_id;
	__u32 __reserved;
	__aligned_u64 user_va;
	__aligned_u64 length;
	__aligned_u64 iova;
};

struct iommu_ioas_copy {
	__u32 size;
	__u32 flags;
	__u32 dst_ioas_id;
	__u32 src_ioas_id;
	__aligned_u64 length;
	__aligned_u64 dst_iova;
	__aligned_u64 src_iova;
};

struct iommu_ioas_unmap {
	__u32 size;
	__u32 ioas_id;
	__aligned_u64 iova;
	__aligned_u64 length;
};

enum iommufd_option {
	IOMMU_OPTION_RLIMIT_MODE = 0,
	IOMMU_OPTION_HUGE_PAGES = 1,
};

enum iommufd_option_ops {
	IOMMU_OPTION_OP_SET = 0,
	IOMMU_OPTION_OP_GET = 1,
};

struct iommu_option {
	__u32 size;
	__u32 option_id;
	__u16 op;
	__u16 __reserved;
	__u32 object_id;
	__aligned_u64 val64;
};

enum iommufd_vfio_ioas_op {
	IOMMU_VFIO_IOAS_GET = 0,
	IOMMU_VFIO_IOAS_SET = 1,
	IOMMU_VFIO_IOAS_CLEAR = 2,
};

struct iommu_vfio_ioas {
	__u32 size;
	__u32 ioas_id;
	__u16 op;
	__u16 __reserved;
};

enum iommufd_hwpt_alloc_flags {
	IOMMU_HWPT_ALLOC_NEST_PARENT = 1 << 0,
	IOMMU_HWPT_ALLOC_DIRTY_TRACKING = 1 << 1,
	IOMMU_HWPT_FAULT_ID_VALID = 1 << 2,
};

enum iommu_hwpt_data_type {
	IOMMU_HWPT_DATA_NONE = 0,
	IOMMU_HWPT_DATA_VTD_S1 = 1,
};

struct iommu_hwpt_alloc {
	__u32 size;
	__u32 flags;
	__u32 dev_id;
	__u32 pt_id;
	__u32 out_hwpt_id;
	__u32 __reserved;
	__u32 data_type;
	__u32 data_len;
	__aligned_u64 data_uptr;
	__u32 fault_id;
	__u32 __reserved2;
};

enum iommu_hw_info_vtd_flags {
	IOMMU_HW_INFO_VTD_ERRATA_772415_SPR17 = 1 << 0,
};

struct iommu_hw_info_vtd {
	__u32 flags;
	__u32 __reserved;
	__aligned_u64 cap_reg;
	__aligned_u64 ecap_reg;
};

enum iommu_hw_info_type {
	IOMMU_HW_INFO_TYPE_NONE = 0,
	IOMMU_HW_INFO_TYPE_INTEL_VTD = 1,
};

enum iommufd_hw_capabilities {
	IOMMU_HW_CAP_DIRTY_TRACKING = 1 << 0,
	IOMMU_HW_CAP_PCI_PASID_EXEC = 1 << 1,
	IOMMU_HW_CAP_PCI_PASID_PRIV = 1 << 2,
};

struct iommu_hw_info {
	__u32 size;
	__u32 flags;
	__u32 dev_id;
	__u32 data_len;
	__aligned_u64 data_uptr;
	__u32 out_data_type;
	__u8 out_max_pasid_log2;
	__u8 __reserved[3];
	__aligned_u64 out_capabilities;
};
"""

# include/uapi/linux/kvm.h
KVM_H = """
#define KVM_API_VERSION 12

#define KVMIO 0xAE

#define KVM_CAP_DEVICE_CTRL 89

#define KVM_CREATE_DEVICE_TEST		1

struct kvm_create_device {
	__u32	type;	/* in: KVM_DEV_TYPE_xxx */
	__u32	fd;	/* out: device handle */
	__u32	flags;	/* in: KVM_CREATE_DEVICE_xxx */
};

struct kvm_device_attr {
	__u32	flags;		/* no flags currently defined */
	__u32	group;		/* device-defined */
	__u64	attr;		/* group-defined */
	__u64	addr;		/* userspace address of attr data */
};

#define  KVM_DEV_VFIO_FILE			1

#define   KVM_DEV_VFIO_FILE_ADD			1
#define   KVM_DEV_VFIO_FILE_DEL			2

/* KVM_DEV_VFIO_GROUP aliases are for compile time uapi compatibility */
#define  KVM_DEV_VFIO_GROUP	1	/* KVM_DEV_VFIO_FILE */

#define   KVM_DEV_VFIO_GROUP_ADD	1	/* KVM_DEV_VFIO_FILE_ADD */
#define   KVM_DEV_VFIO_GROUP_DEL	2	/* KVM_DEV_VFIO_FILE_DEL */
#define   KVM_DEV_VFIO_GROUP_SET_SPAPR_TCE		3

enum kvm_device_type {
	KVM_DEV_TYPE_FSL_MPIC_20	= 1,
	KVM_DEV_TYPE_FSL_MPIC_42,
	KVM_DEV_TYPE_XICS,
	KVM_DEV_TYPE_VFIO,
	KVM_DEV_TYPE_ARM_VGIC_V2,
	KVM_DEV_TYPE_FLIC,
	KVM_DEV_TYPE_ARM_VGIC_V3,
	KVM_DEV_TYPE_ARM_VGIC_ITS,
	KVM_DEV_TYPE_XIVE,
	KVM_DEV_TYPE_ARM_PV_TIME,
	KVM_DEV_TYPE_RISCV_AIA,
	KVM_DEV_TYPE_MAX,
};

struct kvm_vfio_spapr_tce {
	__s32	groupfd;
	__s32	tablefd;
};
"""

#: (header, cdef text) in the order they are declared.
HEADERS: tuple[tuple[str, str], ...] = (
    ("linux/types.h", TYPES),
    ("linux/vfio.h", VFIO_H),
    ("linux/iommufd.h", IOMMUFD_H),
    ("linux/kvm.h", KVM_H),
)
